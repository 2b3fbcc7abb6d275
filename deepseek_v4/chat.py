"""The DeepSeek-V4 chat format: messages <-> prompt text <-> token ids, in the three reasoning modes.

    text = chat.encode(messages, mode="think-high")      # ends with the generation prompt after a user/tool turn
    msg = chat.parse(completion_text, mode="think-high")  # {"role", "reasoning_content", "content", "tool_calls"}
    ids = chat.token_ids(messages, mode="non-think")      # int32 [n], special tokens as their single ids
    ids, mask = chat.token_ids_and_loss_mask(messages, mode, include_reasoning=True)   # for SFT

The text is byte-identical to the encoder that ships with the released weights (format and rules: docs/chat.md).
Modes: "non-think" (the assistant prefix is closed with `</think>` at once), "think-high" (it opens `<think>`),
"think-max" (think-high plus a fixed reasoning-effort prefix at the very start of the prompt).

Messages are OpenAI-style dicts. Roles: system (`content`, optional `tools` in OpenAI function format), user,
assistant (`content`, optional `reasoning_content`, optional `tool_calls` with JSON-string arguments), tool
(`content`, optional `tool_call_id`), latest_reminder. Anything else gives a one-line ValueError.
"""

from __future__ import annotations

import bisect
import copy
import functools
import json
import re
from typing import Any

import numpy as np
import tokenizers

from deepseek_v4.tokenizer import VOCAB_SIZE, tokenizer_json_path

MODES = ("non-think", "think-high", "think-max")
ROLES = ("system", "user", "assistant", "tool", "latest_reminder")

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
# Single ids of the special tokens in the released tokenizer.json (checked by the tests).
SPECIAL_TOKEN_IDS = {BOS: 0, EOS: 1, USER: 128803, ASSISTANT: 128804, THINK_START: 128821, THINK_END: 128822,
                     DSML: 128825, LATEST_REMINDER: 128828}

THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

_TOOLS_PROMPT = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    f'"<{DSML}tool_calls>" block like the following:\n\n'
    f"<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside "
    f"{THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{tool_schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)

_TOOL_CALLS_START = f"\n\n<{DSML}tool_calls"  # how a completion's tool-call block begins
_TOOL_CALLS_END = f"</{DSML}tool_calls>"
# Keys the release's encoder reads that this module does not implement; rejected rather than silently ignored.
_UNSUPPORTED_KEYS = ("task", "content_blocks", "wo_eos", "response_format")

# Segment kinds of the rendered text: "prompt" (never trained on), "reasoning" (an assistant turn's reasoning and
# its closing </think>), "answer" (the rest of an assistant turn: content, tool calls, EOS).
_PROMPT, _REASONING, _ANSWER = "prompt", "reasoning", "answer"


# ---- public API ----------------------------------------------------------------------------------------------


def encode(messages: list[dict[str, Any]], mode: str = "non-think", *, drop_thinking: bool = True) -> str:
    """The prompt text of `messages` in `mode`, starting with BOS.

    After a final user or tool message the text ends with the generation prompt (`<｜Assistant｜></think>` in
    non-think mode, `<｜Assistant｜><think>` in the think modes); after a final assistant message it ends with that
    turn's EOS (a whole conversation, for SFT). `drop_thinking` (the release's default True) removes the
    reasoning of assistant turns before the last user message; it is ignored when the system message has tools.
    """
    return "".join(text for text, _ in _render(messages, mode, drop_thinking))


def parse(text: str, mode: str = "non-think") -> dict[str, Any]:
    """An assistant completion (the text generated after the generation prompt) as a message dict.

    Returns {"role": "assistant", "reasoning_content": str, "content": str, "tool_calls": [OpenAI-style calls,
    arguments as JSON strings]}. The text must end with EOS (optional after a tool-call block), and in the think
    modes must contain `</think>`. Malformed or truncated text gives a one-line ValueError.
    """
    thinking = _thinking(mode)
    if not isinstance(text, str):
        raise ValueError(f"completion must be a str, got {type(text).__name__}")
    pos, reasoning = 0, ""
    if thinking:
        pos, reasoning, stop = _read_until(text, pos, (THINK_END, _TOOL_CALLS_START))
        if stop != THINK_END:
            raise ValueError("malformed completion: the reasoning is not closed by </think>")
    pos, content, stop = _read_until(text, pos, (EOS, _TOOL_CALLS_START))
    tool_calls: list[dict[str, Any]] = []
    if stop == _TOOL_CALLS_START:
        pos, tool_calls = _parse_tool_calls(text, pos)
        pos, rest, stop = _read_until(text, pos, (EOS,))
        if rest:
            raise ValueError(f"malformed completion: unexpected text after the tool calls: {rest[:80]!r}")
    elif stop != EOS:
        raise ValueError("malformed completion: no end-of-sentence token (truncated?)")
    if pos != len(text):
        raise ValueError(f"malformed completion: text after the end-of-sentence token: {text[pos:pos + 80]!r}")
    for token in (BOS, EOS, THINK_START, THINK_END, DSML):
        if token in content or token in reasoning:
            raise ValueError(f"malformed completion: special token {token!r} inside the reasoning or content")
    return {"role": "assistant", "reasoning_content": reasoning, "content": content, "tool_calls": tool_calls}


def token_ids(messages: list[dict[str, Any]], mode: str = "non-think", *, drop_thinking: bool = True) -> np.ndarray:
    """int32 token ids of `encode(messages, mode)` with the real tokenizer (special tokens -> their single ids)."""
    return token_ids_and_loss_mask(messages, mode, drop_thinking=drop_thinking)[0]


def token_ids_and_loss_mask(messages: list[dict[str, Any]], mode: str = "non-think", *,
                            include_reasoning: bool = True,
                            drop_thinking: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the encoded conversation and a loss mask: True on the tokens of assistant turns.

    An assistant turn's tokens are its reasoning and `</think>` (think modes; only where the encoding keeps the
    reasoning), its content, its tool-call block and its EOS; the role prefix and generation prompt are not part
    of it. `include_reasoning=False` leaves the reasoning and its `</think>` out of the mask.
    Shapes: ids int32 [n], mask bool [n].
    """
    segments = _render(messages, mode, drop_thinking)
    text = "".join(t for t, _ in segments)
    encoding = _chat_tokenizer().encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, np.int32)
    if ids.size and int(ids.max()) >= VOCAB_SIZE:
        raise ValueError(f"tokenizer produced id {int(ids.max())}, outside the model's {VOCAB_SIZE} rows")
    starts, kinds, at = [], [], 0
    for segment_text, kind in segments:
        if segment_text:
            starts.append(at)
            kinds.append(kind)
            at += len(segment_text)
    trained = {_ANSWER, _REASONING} if include_reasoning else {_ANSWER}
    mask = np.array([kinds[bisect.bisect_right(starts, start) - 1] in trained for start, _ in encoding.offsets],
                    dtype=bool)
    return ids, mask


# ---- rendering -----------------------------------------------------------------------------------------------


def _thinking(mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"unknown chat mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode != "non-think"


def _to_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"value is not JSON-serialisable: {e}") from e


def _render(messages: list[dict[str, Any]], mode: str, drop_thinking: bool) -> list[tuple[str, str]]:
    """The encoded conversation as (text, kind) segments whose concatenation is the prompt text."""
    thinking = _thinking(mode)
    msgs = _merge_tool_results(_checked(messages))
    # With tools on the system message every turn keeps its reasoning (the release's rule).
    drop = drop_thinking and not any(m.get("tools") for m in msgs)
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    out: list[tuple[str, str]] = [(BOS, _PROMPT)]
    if mode == "think-max":
        out.append((THINK_MAX_PREFIX, _PROMPT))  # before the first message, whatever its role
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "system":
            text = m.get("content") or ""
            if m.get("tools"):
                schemas = "\n".join(_to_json(t["function"]) for t in m["tools"])
                text += "\n\n" + _TOOLS_PROMPT.replace("{tool_schemas}", schemas)
            out.append((text, _PROMPT))
        elif role == "user":
            parts = [text if kind == "text" else f"<tool_result>{text}</tool_result>" for kind, text, _ in m["blocks"]]
            out.append((USER + "\n\n".join(parts), _PROMPT))
        elif role == "latest_reminder":
            out.append((LATEST_REMINDER + m["content"], _PROMPT))
        else:  # assistant
            # Earlier turns lose their reasoning (and their </think>) when thinking is dropped.
            if thinking and (not drop or i > last_user):
                out.append(((m.get("reasoning_content") or "") + THINK_END, _REASONING))
            calls = ""
            if m.get("tool_calls"):
                invokes = "\n".join(_render_tool_call(tc["function"]) for tc in m["tool_calls"])
                calls = f"\n\n<{DSML}tool_calls>\n{invokes}\n</{DSML}tool_calls>"
            out.append(((m.get("content") or "") + calls + EOS, _ANSWER))
        # A user turn followed by nothing, an assistant or a reminder is followed by the assistant prefix.
        next_role = msgs[i + 1]["role"] if i + 1 < len(msgs) else None
        if role == "user" and next_role in (None, "assistant", "latest_reminder"):
            opens_thinking = thinking and (not drop or i >= last_user)
            out.append((ASSISTANT + (THINK_START if opens_thinking else THINK_END), _PROMPT))
    return out


def _render_tool_call(function: dict[str, Any]) -> str:
    raw = function["arguments"]
    try:
        arguments = json.loads(raw)
    except ValueError:
        arguments = {"arguments": raw}  # the release passes unparseable arguments through as one string
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {function['name']!r}: arguments must be a JSON object, got {raw[:80]!r}")
    params = [
        f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
        f"{value if isinstance(value, str) else _to_json(value)}</{DSML}parameter>"
        for key, value in arguments.items()
    ]
    return f'<{DSML}invoke name="{function["name"]}">\n' + "\n".join(params) + f"\n</{DSML}invoke>"


def _checked(messages: Any) -> list[dict[str, Any]]:
    """Validate the messages; raise a one-line ValueError naming the first bad one."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is a {type(m).__name__}, not a dict")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        bad = [k for k in _UNSUPPORTED_KEYS if k in m]
        if bad:
            raise ValueError(f"message {i}: field(s) {', '.join(bad)} are not supported")
        content = m.get("content")
        if role in ("user", "tool", "latest_reminder"):
            if not isinstance(content, str):
                raise ValueError(f"message {i} ({role}): content must be a str, got {type(content).__name__}")
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a str or None, got {type(content).__name__}")
        if m.get("tools") and role != "system":
            raise ValueError(f"message {i} ({role}): tools belong on the system message")
        if role == "system" and m.get("tools") is not None:
            _check_tools(i, m["tools"])
        if role == "assistant":
            if m.get("reasoning_content") is not None and not isinstance(m["reasoning_content"], str):
                raise ValueError(f"message {i}: reasoning_content must be a str or None")
            if m.get("tool_calls") is not None:
                _check_tool_calls(i, m["tool_calls"])
        elif m.get("tool_calls"):
            raise ValueError(f"message {i} ({role}): only assistant messages have tool_calls")
        if role == "tool" and not isinstance(m.get("tool_call_id", ""), str):
            raise ValueError(f"message {i}: tool_call_id must be a str")
    return list(messages)


def _check_tools(i: int, tools: Any) -> None:
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              for t in tools):
        raise ValueError(f"message {i}: tools must be a list of {{'type': 'function', 'function': {{...}}}} dicts")


def _check_tool_calls(i: int, calls: Any) -> None:
    if not isinstance(calls, list):
        raise ValueError(f"message {i}: tool_calls must be a list")
    for tc in calls:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"message {i}: each tool call needs {{'function': {{'name': str, 'arguments': str}}}}")
        if not isinstance(fn.get("arguments"), str):
            raise ValueError(f"message {i}: tool call {fn['name']!r} arguments must be a JSON string, "
                             f"got {type(fn.get('arguments')).__name__}")


def _merge_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold tool messages into user turns, as the release does, and order each turn's results by call order.

    A tool result joins the preceding user turn (or starts one); a user message right after a tool result or
    another user message joins that turn too. A user turn's blocks are ("text" | "tool", text, tool_call_id).
    When a turn holds several results they are reordered by the position of their tool_call_id among the calls
    of the latest assistant message with tool calls (unknown ids sort as position 0; stable otherwise).
    """
    merged: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role in ("user", "tool"):
            block = ("text", m["content"], "") if role == "user" else ("tool", m["content"], m.get("tool_call_id", ""))
            if merged and merged[-1]["role"] == "user":
                merged[-1]["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block]})
        else:
            merged.append(copy.copy(m))
    order: dict[str, int] = {}
    for m in merged:
        if m["role"] == "assistant" and m.get("tool_calls"):
            order = {}
            for k, tc in enumerate(m["tool_calls"]):
                call_id = tc.get("id") or tc["function"].get("id", "")
                if call_id:
                    order[call_id] = k
        elif m["role"] == "user" and order:
            results = [b for b in m["blocks"] if b[0] == "tool"]
            if len(results) > 1:
                ordered = iter(sorted(results, key=lambda b: order.get(b[2], 0)))
                m["blocks"] = [next(ordered) if b[0] == "tool" else b for b in m["blocks"]]
    return merged


# ---- parsing -------------------------------------------------------------------------------------------------


def _read_until(text: str, pos: int, stops: tuple[str, ...]) -> tuple[int, str, str | None]:
    """(position after the earliest stop string, the text before it, that stop) or (len, rest, None)."""
    best, found = len(text), None
    for stop in stops:
        at = text.find(stop, pos)
        if at != -1 and at < best:
            best, found = at, stop
    if found is None:
        return len(text), text[pos:], None
    return best + len(found), text[pos:best], found


_INVOKE_NAME = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)
_PARAMETER = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<', re.DOTALL)


def _parse_tool_calls(text: str, pos: int) -> tuple[int, list[dict[str, Any]]]:
    """Parse a DSML tool-call block starting just after `\\n\\n<｜DSML｜tool_calls`; return (position, calls)."""
    invoke, invoke_end = f"<{DSML}invoke", f"</{DSML}invoke"
    parameter, parameter_end = f"<{DSML}parameter", f"/{DSML}parameter"
    calls = []
    while True:
        pos, between, stop = _read_until(text, pos, (invoke, _TOOL_CALLS_END))
        if between != ">\n":
            raise ValueError(f"malformed tool calls: expected '>\\n' before an invoke, got {between[:80]!r}")
        if stop == _TOOL_CALLS_END:
            return pos, calls
        if stop is None:
            raise ValueError("malformed tool calls: the tool-call block is not closed")
        pos, head, stop = _read_until(text, pos, (parameter, invoke_end))
        name = _INVOKE_NAME.fullmatch(head)
        if name is None or stop is None:
            raise ValueError(f"malformed tool calls: bad invoke header {head[:80]!r}")
        arguments: list[str] = []
        seen: set[str] = set()
        while stop == parameter:
            pos, body, stop = _read_until(text, pos, (parameter_end,))
            match = _PARAMETER.fullmatch(body)
            if match is None or stop is None:
                raise ValueError(f"malformed tool calls: bad parameter {body[:80]!r}")
            key, is_string, value = match.groups()
            if key in seen:
                raise ValueError(f"malformed tool calls: parameter {key!r} given twice")
            seen.add(key)
            arguments.append(f"{_to_json(key)}: {_to_json(value) if is_string == 'true' else value}")
            pos, between, stop = _read_until(text, pos, (parameter, invoke_end))
            if between != ">\n" or stop is None:
                raise ValueError(f"malformed tool calls: expected '>\\n' after a parameter, got {between[:80]!r}")
        calls.append({"type": "function",
                      "function": {"name": name.group(1), "arguments": "{" + ", ".join(arguments) + "}"}})


@functools.cache
def _chat_tokenizer():
    """The released tokenizer as the release applies it to a prompt: every special-token string -> its id."""
    return tokenizers.Tokenizer.from_file(tokenizer_json_path())
