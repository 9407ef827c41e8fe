"""`python -m ember.cli` runs the `ember` command."""

from ember.cli.app import app

app()
