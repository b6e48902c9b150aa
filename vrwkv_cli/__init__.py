"""vrwkv command line: a thin Typer shell over vrwkv_core (see vrwkv_cli.main)."""
