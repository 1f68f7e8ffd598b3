"""The online half of the product: a FastAPI app answering POST /localize (see service.app)."""
