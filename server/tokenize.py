"""vLLM's POST /tokenize (images and pruning settings included) and /detokenize."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse, Response

from feather_vllm.pruning import config as pcfg
from feather_vllm.pruning.cost import kept_per_stage_bounds
from server import fields
from server.chat import resolve_pruning
from server.conversation import check_template_input, conversation
from server.deps import check_model, check_unknown_fields, require_engine, require_key, state_of, validated
from server.errors import APIError, validation_param
from server.offloop import OffLoopRoute
from server.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    ImageSpan,
    StageBound,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizePruning,
    TokenizeResponse,
)
from server.state import GatewayState

router = APIRouter(route_class=OffLoopRoute)  # JSON bodies parsed in a worker thread


@router.post("/tokenize", dependencies=[Depends(require_key), Depends(require_engine)])
async def tokenize(body: dict[str, Any] = Body(...), state: GatewayState = Depends(state_of)) -> Response:
    """vLLM's /tokenize: a text `prompt`, or chat `messages` rendered with the
    chat template as a chat completion would be. Images are loaded and
    expanded into their placeholder tokens as vLLM's own /tokenize does; the
    answer adds where they are (`images`, `image_tokens`) and, with `feather`
    settings, what each cut would keep of them (`feather`)."""
    from vllm.renderers import TokenizeParams

    chat = "messages" in body
    req = validated(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)
    check_model(req.model, state)
    check_unknown_fields(req.model_extra, state, "tokenize ")
    tok_params = TokenizeParams(max_total_tokens=None, max_output_tokens=0, add_special_tokens=req.add_special_tokens)
    if not chat:
        prompt = await state.engine.renderer.tokenize_prompt_async({"prompt": req.prompt}, tok_params)
        return _answer(TokenizeResponse(count=len(prompt["prompt_token_ids"]), max_model_len=state.layout.max_model_len,
                                        tokens=list(prompt["prompt_token_ids"])), req, state)
    for name in ("chat_template", "media_io_kwargs", "mm_processor_kwargs"):
        if getattr(req, name) not in (None, [], {}):
            raise APIError(400, f"{name} is not supported by this server ({fields.ALL_FIELDS[name][1]})",
                           param=name, code="unsupported_parameter")
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt: false",
                       param="continue_final_message")
    check_template_input(state, req.messages, req.chat_template_kwargs, req.tools)
    config = resolve_pruning(req.feather, state) if req.feather is not None else None
    template_kwargs = dict(req.chat_template_kwargs or {})
    if req.tools is not None:  # vLLM's /tokenize passes them to the template whatever the tool flags
        template_kwargs["tools"] = [tool.model_dump() for tool in _tools(req.tools)]
    messages = await conversation(req.messages, state)
    engine_input, tokens = await state.render(messages, tok_params, add_generation_prompt=req.add_generation_prompt,
                                              continue_final_message=req.continue_final_message,
                                              template_kwargs=template_kwargs, skip_mm_cache=True)
    spans = [ImageSpan(offset=r.offset, length=r.length)
             for r in (engine_input.get("mm_placeholders") or {}).get("image", ())]
    response = TokenizeResponse(count=len(tokens), max_model_len=state.layout.max_model_len, tokens=tokens)
    if spans or config is not None:
        response.images = spans
        response.image_tokens = sum(s.length for s in spans)
    if config is not None:
        response.feather = _pruning(config, [s.length for s in spans])
    return _answer(response, req, state)


def _answer(response: TokenizeResponse, req: Any, state: GatewayState) -> Response:
    """vLLM's fields (token_strs null unless asked), the gateway's only when set."""
    if req.return_token_strs:
        response.token_strs = state.tokenizer.convert_ids_to_tokens(response.tokens)
    data = response.model_dump(exclude={k for k in ("image_tokens", "images", "feather")
                                        if getattr(response, k) is None})
    return JSONResponse(data)


def _tools(tools: list[Any]) -> list[Any]:
    """`tools` as vLLM's ChatCompletionToolsParam (400 naming the field when invalid)."""
    from pydantic import TypeAdapter, ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam

    try:
        return TypeAdapter(list[ChatCompletionToolsParam]).validate_python(tools)
    except ValidationError as e:
        first = e.errors()[0]
        param = validation_param(("tools", *first.get("loc", ())))
        raise APIError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param) from None


def _pruning(config: pcfg.PruningConfig, images: list[int]) -> TokenizePruning:
    """Image tokens each cut keeps, per image and in all, from the settings
    alone (the bounds the scheduler reserves KV for)."""
    per_image = [[StageBound(layer=stage.layer, kept_min=lo, kept_max=hi)
                  for stage, (lo, hi) in zip(config.stages, kept_per_stage_bounds(config, length))]
                 for length in images]
    total = [StageBound(layer=stage.layer, kept_min=sum(img[s].kept_min for img in per_image),
                        kept_max=sum(img[s].kept_max for img in per_image))
             for s, stage in enumerate(config.stages)]
    return TokenizePruning(preset=config.name, image_tokens=sum(images), stages=total, images=per_image)


@router.post("/detokenize", dependencies=[Depends(require_key), Depends(require_engine)])
async def detokenize(body: dict[str, Any] = Body(...), state: GatewayState = Depends(state_of)) -> DetokenizeResponse:
    """vLLM's /detokenize: token ids back to text."""
    from vllm.renderers import TokenizeParams

    req = validated(DetokenizeRequest, body)
    check_model(req.model, state)
    check_unknown_fields(req.model_extra, state, "detokenize ")
    vocab = state.engine.model_config.get_vocab_size()
    for i, token in enumerate(req.tokens):
        if token >= vocab:
            raise APIError(400, f"token id {token} is outside the vocabulary (size {vocab})", param=f"tokens[{i}]")
    params = TokenizeParams(max_total_tokens=None, max_output_tokens=0, needs_detokenization=True)
    prompt = await state.engine.renderer.tokenize_prompt_async({"prompt_token_ids": req.tokens}, params)
    return DetokenizeResponse(prompt=prompt["prompt"])
