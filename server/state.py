"""What the gateway holds while it runs: settings, engine, limits."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
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
        self.default_sampling_params: dict[str, Any] = {}  # the model's generation config, as vLLM's server
        self.tool_parser: Any = None  # vLLM's parser class for --tool-call-parser (server/tools.py)
        # Graceful shutdown (server/app.py `Drain`): vLLM's --shutdown-timeout, the gateway's default when unset.
        self.shutdown_timeout: float = 0.0
        self.draining = False  # SIGTERM seen: new requests get 503, admitted ones finish
        self.calls: set[Any] = set()  # chat completions admitted and not yet settled (inflight.Call)
        # Per-process secret of the per-key prefix-cache salts: never sent, never logged.
        self._salt_secret = secrets.token_bytes(32)

    # -- readiness -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.engine is not None and not getattr(self.engine, "errored", False) and not self.draining

    def not_ready_reason(self) -> str:
        if self.draining:
            return "the server is shutting down; retry on another instance"
        if self.start_error:
            return f"engine failed to start: {self.start_error}"
        if self.engine is None:
            return "engine is starting"
        return "engine is dead"

    def attach(self, engine: Any, layout: EngineLayout) -> None:
        """Serve `engine`; `layout` is read from it once, at start."""
        self.layout = layout
        if not layout.pruning.available:
            logger.warning("%s; the model is served as vLLM serves it, and requests with pruning settings "
                           "get 400", layout.pruning.unavailable_reason)
        self.tokenizer = engine.renderer.tokenizer
        model_config = getattr(getattr(engine, "vllm_config", None), "model_config", None)
        if model_config is not None:
            self.default_sampling_params = model_config.get_diff_sampling_param()
            if self.settings.enable_auto_tool_choice:
                from server.tools import parser_class

                self.tool_parser = parser_class(self.settings, model_config, self.tokenizer)
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
        """Take a slot unless running + waiting requests are at the limit
        (the server is draining: `ready` is false, callers answer 503)."""
        running = self.layout.max_num_seqs if self.layout is not None else 0
        if self.in_flight >= running + self.settings.max_waiting_requests:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1

    # -- prompts -------------------------------------------------------------------

    def tok_params(self, vllm_request: Any) -> Any:
        """vLLM's tokenization params of a chat request (its own
        `build_tok_params`: context length, truncation, special tokens)."""
        from vllm.exceptions import VLLMValidationError

        try:
            return vllm_request.build_tok_params(self.engine.model_config)
        except VLLMValidationError as e:
            raise APIError(400, str(e.args[0] if e.args else e), param=e.parameter) from None

    def verify_params(self, params: Any) -> None:
        """The checks vLLM's engine runs on a request's sampling params
        (`InputProcessor._validate_params`: token ids against the vocabulary,
        structured outputs, bad words), on a copy, before the request is
        started: a refusal is a 400, not an error inside a stream."""
        processor = self.engine.input_processor
        check = params.clone()
        check.verify(processor.model_config, processor.speculative_config, processor.structured_outputs_config,
                     processor.tokenizer)
        if processor.tokenizer is not None:
            check.update_from_tokenizer(processor.tokenizer)

    def cache_salt(self, key_index: int | None, client_salt: str | None) -> str | None:
        """vLLM's prefix-cache salt of a request. With API keys, each key's
        requests share cached prefixes only among themselves: the salt is a
        keyed hash (HMAC-SHA256 with a per-process secret) of the key and
        the client's own salt, if any; never the key itself. Without keys,
        or with --share-prefix-cache-across-keys, the client's salt as given
        (vLLM's behaviour)."""
        keys = self.settings.api_keys
        if not keys or key_index is None or self.settings.share_prefix_cache_across_keys:
            return client_salt
        message = keys[key_index].encode("utf-8", "surrogateescape") + b"\0"
        if client_salt is not None:
            message += b"\1" + client_salt.encode("utf-8", "surrogateescape")
        return hmac.new(self._salt_secret, message, hashlib.sha256).hexdigest()

    async def render(self, conversation: list[dict[str, Any]], tok_params: Any = None, *,
                     add_generation_prompt: bool = True, continue_final_message: bool = False,
                     cache_salt: str | None = None, template_kwargs: dict[str, Any] | None = None,
                     skip_mm_cache: bool = False) -> tuple[Any, list[int]]:
        """Chat template + multimodal processing by vLLM's own renderer;
        `tok_params` vLLM's (default: its chat defaults, no special tokens
        added: the template emits BOS itself, as in vLLM's OpenAI server)."""
        from vllm.exceptions import VLLMClientError
        from vllm.renderers.params import ChatParams

        renderer = self.engine.renderer
        # `template_kwargs` (the request's chat_template_kwargs, the tools) under the two the gateway sets.
        chat_params = ChatParams(chat_template_kwargs={**(template_kwargs or {}),
                                                       "add_generation_prompt": add_generation_prompt,
                                                       "continue_final_message": continue_final_message})
        if tok_params is None:
            tok_params = renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False)
        extras = {"cache_salt": cache_salt} if cache_salt is not None else None
        # vLLM's renderer records each processed image in its sender cache
        # (the engine then gets the image's hash only). A truncation that the
        # renderer refuses after processing would leave an entry the engine
        # never got: the next request with that image would fail. Such
        # requests bypass the cache (vLLM's /tokenize does the same).
        # `skip_mm_cache`: a render the engine never gets (e.g. /tokenize).
        skip = skip_mm_cache or getattr(tok_params, "truncate_prompt_tokens", None) is not None
        try:
            _, (engine_input,) = await renderer.render_chat_async([conversation], chat_params, tok_params,
                                                                  prompt_extras=extras, skip_mm_cache=skip)
        except (VLLMClientError, ValueError, TypeError, KeyError) as e:
            # vLLM's renderer checks the prompt against the context length itself.
            parameter = getattr(e, "parameter", None)
            code = "context_length_exceeded" if parameter in ("input_tokens", "input_text") else None
            param = parameter if parameter and not code else "messages"
            message = e.args[0] if isinstance(e, VLLMClientError) and e.args else e
            raise APIError(400, f"messages could not be rendered: {message}", param=param, code=code) from None
        except Exception as e:  # noqa: BLE001 - the renderer's own failure: a clean 500, logged
            logger.exception("rendering failed")
            raise APIError(500, f"messages could not be rendered: {type(e).__name__}", code="render_error") from None
        return engine_input, list(engine_input["prompt_token_ids"])


    def forget_rendered(self, engine_input: Any) -> None:
        """A rendered request that never reached the engine: its images leave
        the renderer's sender cache (see `render`), so that the next request
        with them sends their data instead of a hash the engine lacks."""
        cache = getattr(getattr(self.engine, "renderer", None), "mm_processor_cache", None)
        hashes = engine_input.get("mm_hashes") if isinstance(engine_input, dict) else None
        if cache is None or not hashes:
            return
        for items in hashes.values():
            for mm_hash in items:
                cache.invalidate(mm_hash)


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
