"""``python -m onenet_ota``: the ``onenet-ota`` command line, for when the console script is not
on ``PATH`` (or to choose the interpreter explicitly)."""

from onenet_ota.cli.main import main

if __name__ == "__main__":
    main()
