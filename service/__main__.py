import sys

from model.allocator import reexec_with_allocator_env

if __name__ == "__main__":
    reexec_with_allocator_env("service")  # CPU forwards keep their freed activation memory
    from service.server import main

    sys.exit(main())
