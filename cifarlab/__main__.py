"""`python -m cifarlab` runs the command line."""
from cifarlab.cli import run

run()
