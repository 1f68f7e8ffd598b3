import sys

from model.allocator import reexec_with_allocator_env

# numpy's BLAS (OpenBLAS) keeps a thread pool of its own, one thread a core; a request's linear algebra (the
# re-rank's [candidates, columns] products) is small, and those threads spinning beside torch's encoder threads
# doubled a photo's latency at concurrency 1 (bench/RESULTS.md, "More candidates for a given heading"). One
# thread unless the environment says otherwise.
SERVICE_ENV_DEFAULTS = {"OPENBLAS_NUM_THREADS": "1"}

if __name__ == "__main__":
    # CPU forwards keep their freed activation memory; BLAS runs in the calling thread
    reexec_with_allocator_env("service", SERVICE_ENV_DEFAULTS)
    from service.server import main

    sys.exit(main())
