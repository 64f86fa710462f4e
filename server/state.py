"""What the gateway holds while it runs: settings, engine, limits."""

from __future__ import annotations

import time
from typing import Any

from feather_vllm.pruning import config as pcfg
from server.errors import APIError
from server.images import ImageLoader
from server.pruning_report import EngineLayout
from server.settings import Settings


class GatewayState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default_config = pcfg.resolve(settings.default_preset)
        self.images = ImageLoader(settings)
        self.started = int(time.time())
        self.engine: Any = None
        self.layout: EngineLayout | None = None
        self.tokenizer: Any = None
        self.start_error: str | None = None
        self.in_flight = 0

    # -- readiness -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.engine is not None and not getattr(self.engine, "errored", False)

    def not_ready_reason(self) -> str:
        if self.start_error:
            return f"engine failed to start: {self.start_error}"
        if self.engine is None:
            return "engine is starting"
        return "engine is dead"

    def attach(self, engine: Any, layout: EngineLayout) -> None:
        self.layout = layout
        self.tokenizer = engine.renderer.tokenizer
        self.engine = engine

    # -- admission ---------------------------------------------------------------

    def admit(self) -> bool:
        """Take a slot unless running + waiting requests are at the limit."""
        if self.in_flight >= self.settings.max_num_seqs + self.settings.max_waiting_requests:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1

    # -- prompts -------------------------------------------------------------------

    async def render(self, conversation: list[dict[str, Any]]) -> tuple[Any, list[int]]:
        """Chat template + multimodal processing by vLLM's own renderer."""
        from vllm.exceptions import VLLMClientError
        from vllm.renderers.params import ChatParams

        renderer = self.engine.renderer
        chat_params = ChatParams(chat_template_kwargs={"add_generation_prompt": True})
        # The template emits BOS itself (as vLLM's OpenAI server does).
        tok_params = renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False)
        try:
            _, (engine_input,) = await renderer.render_chat_async([conversation], chat_params, tok_params)
        except (VLLMClientError, ValueError, TypeError, KeyError) as e:
            raise APIError(400, f"messages could not be rendered: {e}", param="messages") from None
        return engine_input, list(engine_input["prompt_token_ids"])
