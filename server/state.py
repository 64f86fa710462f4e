"""What the gateway holds while it runs: settings, engine, limits."""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from feather_vllm.pruning import config as pcfg
from server.errors import APIError
from server.images import ImageLoader
from server.settings import Settings

if TYPE_CHECKING:
    from server.engine import EngineLayout

logger = logging.getLogger("server")


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
        self.special_text: re.Pattern[str] | None = None  # special-token strings refused in message text
        self.exit_code: int | None = None  # set when the gateway must stop (its engine died)

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
        image_token_id = getattr(layout, "image_token_id", None)
        if image_token_id is None:
            hf_config = getattr(getattr(getattr(engine, "vllm_config", None), "model_config", None), "hf_config", None)
            image_token_id = getattr(hf_config, "image_token_index", None)
        strings = special_token_strings(self.tokenizer, image_token_id)
        if strings:
            self.special_text = re.compile("|".join(map(re.escape, sorted(strings, key=len, reverse=True))))
        self.engine = engine

    # -- message text --------------------------------------------------------------

    def refuse_special_tokens(self, messages: list[Any]) -> None:
        """Text may not spell a special token: the tokenizer would turn the
        image placeholder into an image slot (taking another image's
        embeddings, or faking an image) and BOS/EOS into turn boundaries."""
        if self.special_text is None:
            return
        for m, message in enumerate(messages):
            if isinstance(message.content, str):
                texts = [(f"messages[{m}].content", message.content)]
            elif isinstance(message.content, list):
                texts = [(f"messages[{m}].content[{p}].text", part.text)
                         for p, part in enumerate(message.content) if part.type == "text"]
            else:
                continue
            for param, text in texts:
                found = self.special_text.search(text)
                if found:
                    raise APIError(400, f"{param}: text contains the special token {found.group()!r}; images go in "
                                        "image_url parts", param=param, code="special_token_in_text")

    # -- admission ---------------------------------------------------------------

    def admit(self) -> bool:
        """Take a slot unless running + waiting requests are at the limit."""
        running = self.layout.max_num_seqs if self.layout is not None else 0
        if self.in_flight >= running + self.settings.max_waiting_requests:
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
            # vLLM's renderer checks the prompt against the context length itself.
            code = "context_length_exceeded" if getattr(e, "parameter", None) == "input_tokens" else None
            raise APIError(400, f"messages could not be rendered: {e}", param="messages", code=code) from None
        except Exception as e:  # noqa: BLE001 - the renderer's own failure: a clean 500, logged
            logger.exception("rendering failed")
            raise APIError(500, f"messages could not be rendered: {type(e).__name__}", code="render_error") from None
        return engine_input, list(engine_input["prompt_token_ids"])


def special_token_strings(tokenizer: Any, image_token_id: int | None = None) -> set[str]:
    """The texts of the tokenizer's special tokens, the image placeholder
    included (whatever its `special` flag says)."""
    strings: set[str] = set()
    for token in getattr(tokenizer, "all_special_tokens", None) or ():
        strings.add(str(token))
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            strings.add(str(added.content))
    if image_token_id is not None:
        try:
            token = tokenizer.convert_ids_to_tokens(image_token_id)
        except Exception:  # noqa: BLE001 - an id the tokenizer does not know: nothing to add
            token = None
        if token:
            strings.add(str(token))
    return {s for s in strings if s}
