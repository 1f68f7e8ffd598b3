import sys

from model.allocator import reexec_with_allocator_env

if __name__ == "__main__":
    reexec_with_allocator_env("index_build")  # CPU encoding keeps its freed activation memory
    from index_build.cli import main

    sys.exit(main())
