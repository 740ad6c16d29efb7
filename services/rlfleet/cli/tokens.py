"""`rlfleet token create | hash`: make API tokens for a scheduler run with --auth token."""

from __future__ import annotations

import sys

from rlfleet.scheduler.auth import TOKENS_ENV, hash_token, new_token


def cmd_token(args) -> None:
    if args.token_command == "create":
        token = new_token()
        digest = hash_token(token)
        label = f" {args.label}" if args.label else ""
        print(f"token: {token}")
        print(f"hash:  {digest}")
        print()
        print("Give the token to its user (RLFLEET_TOKEN). Store only the hash on the server,")
        print("as a line of the tokens file (--api-tokens-file):")
        print(f"  {digest} {args.role}{label}")
        print(f"or in {TOKENS_ENV}:  {digest}:{args.role}")
        return
    token = args.token if args.token not in (None, "-") else sys.stdin.readline().strip()
    if not token:
        raise SystemExit("error: no token given")
    print(hash_token(token))
