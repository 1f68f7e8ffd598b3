import sys

from index_build.cli import main

if __name__ == "__main__":
    sys.exit(main())
