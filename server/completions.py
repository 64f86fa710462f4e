"""POST /v1/completions: vLLM's legacy completions on text prompts (a
string, strings, token ids or lists of them), with vLLM's own request class
(its validators and `to_sampling_params`) and renderer, and the answer shapes
of its server (vllm/entrypoints/openai/completion/serving.py): one engine
request per prompt, `echo`, integer `logprobs`, `n`, usage, streaming.

No images: vLLM 0.32's completions take none, so the `feather` pruning
settings are refused here (nothing to prune)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from server import fields
from server.chat import max_tokens_room, sampling_params, vllm_request
from server.deps import check_model, check_unknown_fields, not_ready_error, require_engine, require_key, state_of, \
    unencodable
from server.errors import APIError, stream_error_event
from server.inflight import Call, engine_error, failed_in_engine, respond, unless_disconnected
from server.logprobs import completion_logprobs, prompt_logprobs
from server.offloop import OffLoopRoute
from server.schemas import CompletionChoice, CompletionResponse, Usage
from server.state import GatewayState

router = APIRouter(route_class=OffLoopRoute)  # JSON bodies parsed in a worker thread
logger = logging.getLogger("server")

NO_IMAGES = ("completions take no images (vLLM 0.32's /v1/completions has no image input), so there is nothing "
             "to prune; send images to /v1/chat/completions")
# Fields of vLLM's CompletionRequest the gateway refuses unless at their
# defaults, as in chat completions (server/fields.py); the rest are vLLM's.
REFUSED = {
    "prompt_embeds": "prompt embeddings are not served",
    **{name: fields.ALL_FIELDS[name][1] for name in ("use_beam_search", "length_penalty", "kv_transfer_params",
                                                    "ec_transfer_params", "vllm_xargs", "thinking_token_budget")},
}


@router.post("/v1/completions", dependencies=[Depends(require_key), Depends(require_engine)])
async def completions(request: Request, body: dict[str, Any] = Body(...),
                      state: GatewayState = Depends(state_of)) -> Response:
    """vLLM's /v1/completions, with the gateway's keys, limits and errors."""
    vreq = _checked(body, state)
    prompts = _prompts(vreq, state)
    cache_salt = state.cache_salt(getattr(request.state, "key_index", None), vreq.cache_salt)
    if not state.ready:  # began draining while this request was read and checked
        raise not_ready_error(state)
    admitted = 0  # one engine request per prompt, each admitted (vLLM runs one per prompt too)
    for _ in prompts:
        if not state.admit():
            for _ in range(admitted):
                state.release()
            raise APIError(429, "too many requests waiting; retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        admitted += 1
    try:
        inputs = await unless_disconnected(request, _render(vreq, prompts, state, cache_salt))
        runs = []
        for engine_input in inputs:
            prompt_ids = list(engine_input["prompt_token_ids"])
            max_tokens = max_tokens_room(len(prompt_ids), vreq.max_tokens, "max_tokens", state, prompt_param="prompt")
            runs.append((engine_input, prompt_ids, sampling_params(vreq, None, max_tokens, state)))
    except BaseException:
        for _ in range(admitted):
            state.release()
        raise
    return await respond(Completion(state, vreq, runs), request, bool(vreq.stream))


def _checked(body: dict[str, Any], state: GatewayState) -> Any:
    """vLLM's CompletionRequest of `body`, after the gateway's checks: no
    lone surrogates, unknown fields (unless --lenient-fields), `feather`
    and `REFUSED` fields, the served model."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    bad = unencodable(body)
    if bad:
        raise APIError(400, f"{bad}: text contains a lone surrogate (not valid Unicode)", param=bad)
    if body.get("feather") is not None:
        raise APIError(400, f"feather: {NO_IMAGES}", param="feather", code="unsupported_parameter")
    known = {k: v for k, v in body.items() if k in CompletionRequest.model_fields}
    check_unknown_fields({k: v for k, v in body.items() if k not in known and k != "feather"}, state, "completion ")
    for name, why in REFUSED.items():
        if name in known and not fields.is_default(name, known[name]):
            raise APIError(400, f"{name} is not supported by this server ({why})", param=name,
                           code="unsupported_parameter")
    vreq = vllm_request(known, CompletionRequest)
    check_model(vreq.model, state)
    return vreq


def _prompts(vreq: Any, state: GatewayState) -> list[Any]:
    """The request's prompts (vLLM's `prompt_to_seq`), `suffix` rendered as
    vLLM does (refused for a model without FIM rendering, as vLLM), the
    image placeholder refused (no image goes with it)."""
    from vllm.renderers.inputs.preprocess import prompt_to_seq

    if vreq.prompt is None or vreq.prompt == "":
        raise APIError(400, "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
    prompts = list(prompt_to_seq(vreq.prompt))
    if not prompts:
        raise APIError(400, "You must pass at least one prompt", param="prompt")
    if vreq.suffix is not None:  # vLLM's OnlineRenderer.render_completion
        if vreq.echo:
            raise APIError(400, "Echo is unsupported with suffix.", param="suffix")
        if vreq.truncate_prompt_tokens is not None:
            raise APIError(400, "suffix is not supported with truncate_prompt_tokens", param="suffix")
        if not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "suffix requires text prompt input for FIM completion rendering", param="suffix")
        rendered = [state.engine.renderer.render_completion_suffix(p, vreq.suffix) for p in prompts]
        if any(r is None for r in rendered):
            raise APIError(400, "suffix is only supported for models with FIM completion rendering", param="suffix")
        prompts = rendered
    image_id = getattr(state.layout, "image_token_id", None)
    image_text = state.tokenizer.convert_ids_to_tokens(image_id) if image_id is not None else None
    many = isinstance(vreq.prompt, list) and not isinstance(vreq.prompt[0], int)  # strings or token lists
    for i, prompt in enumerate(prompts):
        param = f"prompt[{i}]" if many else "prompt"
        if (isinstance(prompt, str) and image_text and image_text in prompt) or \
                (isinstance(prompt, list) and image_id in prompt):
            raise APIError(400, f"{param}: the image placeholder {image_text!r} without an image; {NO_IMAGES}",
                           param=param, code="special_token_in_text")
    return prompts


async def _render(vreq: Any, prompts: list[Any], state: GatewayState, cache_salt: str | None) -> list[Any]:
    """vLLM's renderer on the prompts (its tokenization params: context
    length, truncation, special tokens, detokenized token prompts for echo)."""
    from vllm.exceptions import VLLMClientError
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    model_config = state.engine.model_config
    tok_params = state.tok_params(vreq)
    try:
        return await state.engine.renderer.render_cmpl_async(
            [parse_model_prompt(model_config, p) for p in prompts], tok_params,
            prompt_extras={"cache_salt": cache_salt} if cache_salt is not None else None)
    except (VLLMClientError, ValueError, TypeError) as e:
        parameter = getattr(e, "parameter", None)
        code = "context_length_exceeded" if parameter in ("input_tokens", "input_text") else None
        message = e.args[0] if isinstance(e, VLLMClientError) and e.args else e
        raise APIError(400, f"prompt could not be tokenized: {message}",
                       param=parameter if parameter and not code else "prompt", code=code) from None


class PromptCall(Call):
    """One prompt's engine request."""

    def __init__(self, state: GatewayState, vreq: Any, engine_input: Any, prompt_ids: list[int], params: Any,
                 request_id: str, response_id: str) -> None:
        super().__init__(state, engine_input, prompt_ids, params, request_id=request_id, response_id=response_id,
                         n=vreq.n, preset="none",  # text only: never pruned
                         priority=vreq.priority, session_id=vreq.session_id)
        # The prompt's text for echo (vLLM's renderer detokenizes token prompts when echo asks).
        prompt = engine_input.get("prompt")
        self.prompt_text = prompt if prompt is not None else state.tokenizer.decode(prompt_ids)


class Completion:
    """A completion request: one engine request per prompt, answered as one
    (choice i of prompt p is choice p * n + i, as in vLLM)."""

    def __init__(self, state: GatewayState, vreq: Any, runs: list[tuple[Any, list[int], Any]]) -> None:
        self.state, self.vreq = state, vreq
        self.request_id = f"cmpl-{uuid.uuid4().hex}"  # the engine's: unique whatever the client sends
        self.response_id = f"cmpl-{vreq.request_id}"  # vLLM's (its request_id: the client's, else random)
        self.calls = [PromptCall(state, vreq, engine_input, prompt_ids, params, f"{self.request_id}-{p}",
                                 self.response_id) for p, (engine_input, prompt_ids, params) in enumerate(runs)]
        self.created = self.calls[0].created

    async def close(self) -> None:
        """Settle every prompt's request (see `Call.close`)."""
        for call in self.calls:
            await call.close()

    def _echoed(self, call: PromptCall, output: Any, prompt_lps: Any) -> tuple[str, list[int], Any]:
        """(text, token ids, logprobs) of a choice with its prompt echoed (vLLM's rules)."""
        prompt_text = "" if self.vreq.return_token_ids else call.prompt_text
        if self.vreq.max_tokens == 0:  # the prompt only
            return prompt_text, call.prompt_ids, prompt_lps
        lps = [*(prompt_lps or []), *(output.logprobs or [])] if self.vreq.logprobs is not None else None
        return prompt_text + output.text, [*call.prompt_ids, *output.token_ids], lps

    def _logprobs(self, token_ids: Any, lps: Any, offset: int = 0) -> dict[str, Any] | None:
        if self.vreq.logprobs is None or lps is None:
            return None
        return completion_logprobs(token_ids, lps, self.vreq.logprobs, self.state.tokenizer,
                                   as_token_ids=bool(self.vreq.return_tokens_as_token_ids),
                                   return_all=bool(self.vreq.logprob_token_ids), initial_offset=offset)

    def _usage(self) -> Usage:
        prompt = sum(len(c.prompt_ids) for c in self.calls)
        completion = sum(sum(c.generated) for c in self.calls)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def complete(self) -> CompletionResponse:
        finals = await asyncio.gather(*(call.run_to_end() for call in self.calls))
        return await asyncio.to_thread(self._response, finals)  # logprobs: thousands of entries, off the loop

    def _response(self, finals: list[Any]) -> CompletionResponse:
        choices = []
        ids = bool(self.vreq.return_token_ids)
        for call, final in zip(self.calls, finals):
            for o in final.outputs:
                if self.vreq.echo:
                    text, token_ids, lps = self._echoed(call, o, final.prompt_logprobs)
                else:
                    text, token_ids, lps = o.text, o.token_ids, o.logprobs
                choices.append(CompletionChoice(
                    index=len(choices), text=text, logprobs=self._logprobs(token_ids, lps),
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                    token_ids=list(o.token_ids) if ids else None,
                    prompt_logprobs=prompt_logprobs(final.prompt_logprobs),
                    prompt_token_ids=call.prompt_ids if ids else None))
        return CompletionResponse(id=self.response_id, created=self.created, model=self.state.settings.model_name,
                                  choices=choices, usage=self._usage())

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        chunk = CompletionResponse(id=self.response_id, created=self.created, model=self.state.settings.model_name,
                                   choices=choices, usage=usage)
        return f"data: {json.dumps(chunk.model_dump(exclude_none=True))}\n\n"

    async def stream(self, request: Request) -> AsyncIterator[str]:
        """vLLM's stream: per choice its deltas (the first with the echoed
        prompt, and the prompt's token ids when asked), usage last when asked."""
        from vllm.utils.async_utils import merge_async_iterators

        n, vreq = self.vreq.n, self.vreq
        started: set[int] = set()  # choices whose prompt was echoed / prompt ids sent
        ended: set[int] = set()
        offsets = [0] * (n * len(self.calls))  # text offsets of the logprobs, per choice
        include_usage = bool(vreq.stream_options and vreq.stream_options.include_usage)
        try:
            try:
                for call in self.calls:
                    call.started = True
                async for p, out in merge_async_iterators(*(call.generate() for call in self.calls)):
                    call = self.calls[p]
                    if any(o.finish_reason == "error" for o in out.outputs):
                        raise failed_in_engine(call.request_id)
                    for o in out.outputs:
                        i = o.index + p * n
                        call.on_tokens(len(o.token_ids))
                        call.generated[o.index] += len(o.token_ids)
                        first = i not in started
                        if vreq.echo and first:
                            text, token_ids, lps = self._echoed(call, o, out.prompt_logprobs)
                        else:
                            text, token_ids, lps = o.text, o.token_ids, o.logprobs
                            if not text and not token_ids and not call.generated[o.index]:
                                continue  # vLLM's: no empty chunks during a chunked prefill
                        started.add(i)
                        if o.finish_reason:
                            ended.add(i)
                        logprobs = self._logprobs(token_ids, lps, offsets[i])
                        if logprobs and logprobs["tokens"]:  # by the tokens reported, not the text (stop strings)
                            offsets[i] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                        yield self._chunk([CompletionChoice(
                            index=i, text=text, logprobs=logprobs, finish_reason=o.finish_reason,
                            stop_reason=o.stop_reason,
                            # vLLM sends the prompt's ids with the echoed prompt too, asked or not
                            prompt_token_ids=call.prompt_ids if first and (vreq.echo or vreq.return_token_ids)
                            else None,
                            token_ids=list(o.token_ids) if vreq.return_token_ids else None)])
                    call.finished = out.finished
                    if await request.is_disconnected():
                        return  # close() aborts the requests in the engine and frees their KV
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:
                # Headers are sent: report the failure in-band, as vLLM's server does.
                logger.exception("engine failed on %s", self.request_id)
                err = engine_error(e)
                yield stream_error_event(err)
                yield "data: [DONE]\n\n"
                return
            if any(call.shutdown_aborted for call in self.calls):
                # Never a silently cut answer: each choice ends with finish_reason "abort", then this error.
                for i in sorted(set(range(n * len(self.calls))) - ended):
                    yield self._chunk([CompletionChoice(index=i, text="", finish_reason="abort")])
                err = self.calls[0].shutdown_error()
                yield stream_error_event(err)
                yield "data: [DONE]\n\n"
                return
            if include_usage:
                yield self._chunk([], usage=self._usage())
            yield "data: [DONE]\n\n"
        finally:
            await self.close()
