"""Typed request and response bodies of the OpenAI chat completions API,
with the `feather` pruning extension."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, StrictBool, StrictFloat, StrictInt,
                      StrictStr, model_serializer)

from feather_vllm.pruning.config import FollowUp


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Strict):
    name: StrictStr
    arguments: StrictStr  # JSON, as the model wrote it


class ToolCall(_Strict):
    """A call in an assistant message (an earlier turn's, sent back)."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    # Unknown keys are refused unless --lenient-fields (conversation.check_messages).
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: StrictStr | None = None  # tool messages: the call this answers


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class StageSettings(_Strict):
    layer: StrictInt
    keep: StrictFloat | StrictInt
    criterion: Literal["rope", "rope_free"] = "rope_free"
    grid_stride: StrictInt | None = Field(None, le=4096)


class FeatherSettings(_Strict):
    """Per-request pruning: a preset, explicit stages, or both (stages win)."""

    preset: StrictStr | None = None
    stages: list[StageSettings] | None = None
    # Also report each stage's kept image-token indices (raster order), e.g.
    # to draw kept-token maps; off by default, the lists are long.
    return_kept: StrictBool = False
    # A follow-up turn about an image an earlier turn of the conversation
    # pruned: "reuse" that turn's pruned KV and kept set, "reselect" (prune
    # again for this turn's question, at full cost), "keep_both" (prune
    # again and keep that turn's kept tokens too) or "add_back" (reuse, and
    # add back what this question ranks highest of what that turn dropped);
    # unset: the preset's.
    follow_up: FollowUp | None = None
    reselect: StrictBool = False  # true: follow_up "reselect"
    # Under "add_back": the share of each image's tokens added back (unset:
    # the first stage's keep).
    add_back: StrictFloat | StrictInt | None = None


MAX_STOP_SEQUENCES = 16
StopString = Annotated[StrictStr, Field(min_length=1, max_length=1000)]


Int64 = Annotated[StrictInt, Field(ge=-2**63, le=2**63 - 1)]
Number = StrictFloat | StrictInt
TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class ChatCompletionRequest(BaseModel):
    """Every field of vLLM 0.32's chat request, each honoured, accepted
    without effect or refused (server/fields.py says which); other fields
    are kept in `model_extra` and refused as unknown unless the gateway runs
    with --lenient-fields (chat._check_fields)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=8)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    seed: Int64 | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    logit_bias: dict[StrictStr, Number] | None = Field(None, max_length=1024)
    response_format: dict[str, Any] | None = None  # checked and converted by vLLM's own request
    feather: FeatherSettings | None = None
    # vLLM's sampling parameters (its `to_sampling_params` checks them further)
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    watermarking: StrictBool | None = None
    stop_token_ids: TokenIds | None = Field(None, max_length=1024)
    include_stop_str_in_output: StrictBool = False
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    logprob_token_ids: TokenIds | None = None
    allowed_token_ids: TokenIds | None = None
    bad_words: list[StrictStr] = Field(default_factory=list, max_length=1024)
    structured_outputs: dict[str, Any] | None = None  # checked and converted by vLLM's own request
    repetition_detection: dict[str, Any] | None = None
    stream_interval: StrictInt | None = Field(None, ge=1)
    # vLLM's prompt and request parameters
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    priority: Int64 = 0
    request_id: StrictStr | None = Field(None, min_length=1, max_length=256)
    session_id: StrictStr | None = Field(None, max_length=256)
    return_tokens_as_token_ids: StrictBool | None = None
    cache_salt: StrictStr | None = Field(None, min_length=1, max_length=128)
    # Accepted, no effect here (server/fields.py: NO_EFFECT)
    user: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    include_reasoning: StrictBool = True
    routed_experts_prompt_start: StrictInt = Field(0, ge=0)
    return_token_offsets: StrictBool | None = None
    mm_payload: Literal["tensors", "none"] = "tensors"
    return_mm_kwargs: StrictBool | None = None
    # Tool calling (server/tools.py): checked by vLLM's own request
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    # vLLM's prompt and answer extras
    echo: StrictBool = False
    chat_template_kwargs: dict[StrictStr, Any] | None = None
    return_token_ids: StrictBool | None = None
    return_prompt_text: StrictBool | None = None
    # Refused unless at their defaults (server/fields.py: REFUSED)
    reasoning_effort: Any = None
    thinking_token_budget: Any = None
    use_beam_search: StrictBool = False
    length_penalty: Number = 1.0
    prompt_logprobs: Any = None
    documents: Any = None
    chat_template: Any = None
    media_io_kwargs: Any = None
    mm_processor_kwargs: Any = None
    kv_transfer_params: Any = None
    ec_transfer_params: Any = None
    vllm_xargs: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StageTotal(BaseModel):
    """One cut, as the engine ran it, over all the request's images."""

    layer: int
    kept: int  # image tokens kept after this cut, all images together


class RegionReport(BaseModel):
    """One region of an anyres image (LLaVA-NeXT: its base view or its tile
    map) after one cut, in the region's own raster."""

    name: str
    rows: int
    cols: int
    kept: int  # raster tokens kept (its newline tokens are counted in StageReport.newlines_kept)
    mean_row: float | None = None  # of the kept tokens, 0 = top row, 1 = bottom
    quadrant_coverage: dict[str, float | None] | None = None  # fraction of each quadrant kept
    kept_indices: list[int] | None = None  # kept tokens as row * cols + col (when asked for)


class StageReport(BaseModel):
    """One cut of one image. A one-raster image (LLaVA-1.5) has its row and
    quadrant statistics here; an anyres image has them per region."""

    layer: int
    kept: int  # this image's tokens kept after this cut (newline tokens included)
    mean_row: float | None = None  # of the kept tokens, 0 = top row, 1 = bottom
    quadrant_coverage: dict[str, float] | None = None  # fraction of each quadrant kept
    kept_indices: list[int] | None = None  # the kept image tokens, 0-based in the image's run (when asked for)
    regions: list[RegionReport] | None = None  # anyres images: per region
    newlines_kept: int | None = None  # anyres images: newline tokens kept (all, by the rule)


class KVBlocksReport(BaseModel):
    """KV-cache blocks the request held when it finished, from the engine's
    block manager, and what the same tokens hold unpruned."""

    used: int
    unpruned: int
    held_per_group: list[int]  # per KV-cache group (one group per stage of layers)


class FallbackReport(BaseModel):
    """Why a request that asked for pruning ran unpruned."""

    reason: str  # a closed set: feather_vllm.pruning.schedule.FallbackReason
    message: str


class ReusedReport(BaseModel):
    """A follow-up turn that reused an earlier turn's pruned KV."""

    tokens: int  # prompt tokens served from the prefix cache, the pruned image included
    kept_from: str  # the engine request id of the turn whose cut decided the kept set
    added: int = 0  # image tokens that kept set lacked, added back for this prompt (follow_up "add_back")


class UnitedReport(BaseModel):
    """A follow-up turn whose cut kept an earlier turn's kept tokens too."""

    kept_from: str  # the engine request id of that turn


class ImageReport(BaseModel):
    """What pruning did to one image (each image keeps its own share)."""

    image_tokens: int
    stages: list[StageReport]


class FeatherReport(BaseModel):
    preset: str
    image_tokens: int  # all images together
    stages: list[StageTotal]
    images: list[ImageReport]  # in prompt order
    kv_blocks: KVBlocksReport
    fallback: FallbackReport | None = None
    reused: ReusedReport | None = None  # kept set and KV from an earlier turn (no cut in this request)
    united: UnitedReport | None = None  # this request's cut kept an earlier turn's kept set too


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]  # name, arguments (a JSON string)


class ChatMessage(BaseModel):
    role: str = "assistant"  # vLLM's: the last message's role when add_generation_prompt is false
    content: str | None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if not data.get("tool_calls"):  # as vLLM: no key when no call
            data.pop("tool_calls", None)
        return data


class Choice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id that ended the choice
    token_ids: list[int] | None = None  # return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    prompt_token_ids: list[int] | None = None  # return_token_ids
    prompt_text: str | None = None  # return_prompt_text
    feather: FeatherReport | None = None


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # vLLM's DeltaToolCall: index, id, type, function


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    prompt_token_ids: list[int] | None = None  # return_token_ids: the first chunk
    prompt_text: str | None = None  # return_prompt_text: the first chunk
    usage: Usage | None = None
    feather: FeatherReport | None = None


class _Tokenize(BaseModel):
    # Unknown fields are refused unless --lenient-fields (deps.check_unknown_fields).
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    return_token_strs: StrictBool | None = False


class TokenizeCompletionRequest(_Tokenize):
    """vLLM's /tokenize body for a text prompt."""

    prompt: StrictStr
    add_special_tokens: StrictBool = True


class TokenizeChatRequest(_Tokenize):
    """vLLM's /tokenize body for chat messages (images included), and the
    gateway's `feather` settings (what each cut would keep)."""

    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    chat_template_kwargs: dict[StrictStr, Any] | None = None
    tools: list[Any] | None = None  # checked as vLLM's ChatCompletionToolsParam
    feather: FeatherSettings | None = None
    # vLLM's, refused as in chat completions (server/fields.py)
    chat_template: Any = None
    media_io_kwargs: Any = None
    mm_processor_kwargs: Any = None


class ImageSpan(BaseModel):
    """An image's placeholder tokens in the prompt: the first one's index, and how many."""

    offset: int
    length: int


class StageBound(BaseModel):
    """Image tokens one cut keeps: exact for top-k stages (min == max), a
    range for stages with a uniform grid (top-k union grid)."""

    layer: int
    kept_min: int
    kept_max: int


class TokenizePruning(BaseModel):
    """What the request's pruning settings keep of its images, from the
    settings alone (feather_vllm.pruning.cost.kept_per_stage_bounds, each
    image its own share), before the engine's decision to fall back."""

    preset: str
    image_tokens: int
    stages: list[StageBound]  # all images together
    images: list[list[StageBound]]  # per image, in prompt order


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
    # The gateway's additions for chat messages with images (absent otherwise):
    image_tokens: int | None = None
    images: list[ImageSpan] | None = None
    feather: TokenizePruning | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class CompletionChoice(BaseModel):
    """One choice of /v1/completions (vLLM's CompletionResponseChoice)."""

    index: int
    text: str
    logprobs: dict[str, Any] | None = None  # text_offset, token_logprobs, tokens, top_logprobs
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
