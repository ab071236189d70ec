"""``python -m vdisk``: the command line, as the ``vdisk`` entry point."""
from .cli import main

main(prog_name="vdisk")
