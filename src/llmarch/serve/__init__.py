"""``llmarch serve``: an OpenAI-compatible HTTP server over the continuous-batching ``Engine``.

    from llmarch.serve import create_app
    app = create_app(engine, model_name="tiny", api_key="secret")   # a FastAPI app
    # uvicorn.run(app), or `llmarch serve --checkpoint DIR`

``EngineWorker`` is the one thread that owns the engine; ``ChatTemplate`` renders conversations as
``transformers`` does; ``ServeLimits`` bounds the queue, prompts, ``n`` and bodies.
"""

from llmarch.serve.app import create_app
from llmarch.serve.chat import ChatTemplate
from llmarch.serve.metrics import ServerMetrics
from llmarch.serve.protocol import APIError, ServeLimits
from llmarch.serve.server import DrainingServer, run_server
from llmarch.serve.worker import EngineWorker

__all__ = [
    "APIError",
    "ChatTemplate",
    "DrainingServer",
    "EngineWorker",
    "ServeLimits",
    "ServerMetrics",
    "create_app",
    "run_server",
]
