"""The built-in environments: ``tools`` (calculator and python tool calls) and
``retry`` (answer, feedback, retry). Each is registered under the entry-point group
``rlfleet.environments`` (pyproject.toml) like a user's own."""
