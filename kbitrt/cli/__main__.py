from kbitrt.cli.main import cli

cli()
