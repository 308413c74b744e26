"""The `trl-onpolicy` command: the dispatcher ([`~trl_onpolicy.commands.cli.main`]) and one module per subcommand
(`quickstart`, `distill`, `eval`, `serve_teacher`, `cache_teacher`). Nothing is imported here, so `trl-onpolicy --help`
loads only the dispatcher and the help formatter."""
