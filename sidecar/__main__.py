import sys

from .cli import main

if __name__ == "__main__":  # multiprocessing's spawn imports the main module again
    sys.exit(main())
