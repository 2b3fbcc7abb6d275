"""The chat encoding against vectors written from the release's specification (the `encoding/` folder that ships
with the DeepSeek-V4 weights: its README and the rules of its reference encoder), checked as text and token by
token with the real tokenizer; parsing; the SFT loss mask; bad input."""

import json

import numpy as np
import pytest

from deepseek_v4 import chat
from deepseek_v4.tokenizer import get_tokenizer

BOS, EOS, USER, ASSISTANT = chat.BOS, chat.EOS, chat.USER, chat.ASSISTANT
D = chat.DSML

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a specific location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"location": "Beijing", "days": 3}'}}

# Tool block appended to the system prompt (release README, "Tool Calling (DSML Format)"): "\n\n" + this text, the
# tool schemas as one JSON object per line (json.dumps with ensure_ascii=False) in place of {schemas}.
TOOLS_BLOCK = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    'writing a "<｜DSML｜tool_calls>" block like the following:\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke '
    'name="$TOOL_NAME">\n<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE'
    '</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name="$TOOL_NAME2">\n...\n'
    '</｜DSML｜invoke>\n'
    "</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set `string=\"true\"`. For all other "
    "types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\nOtherwise, output directly after </think> "
    "with tool calls or final response.\n\n### Available Tool Schemas\n\n{schemas}\n\nYou MUST strictly follow "
    "the above defined tool name and parameter schemas to invoke tool calls.\n"
)
# Release README, "Reasoning Effort": prepended at the very beginning (after BOS, before the system message).
MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking "
    "and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic "
    "against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire "
    "deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis "
    "to ensure absolutely no assumption is left unchecked.\n\n"
)

TWO_TURNS = [  # the multi-turn example without tools of the release's encoder tests
    SYSTEM,
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "reasoning_content": "The user said hello, I should greet back.",
     "content": "Hi there! How can I help you?"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "reasoning_content": "The user asks about the capital of France. It is Paris.",
     "content": "The capital of France is Paris."},
]

TOOL_CONVERSATION = [
    {**SYSTEM, "tools": [WEATHER_TOOL]},
    {"role": "user", "content": "What's the weather in Beijing?"},
    {"role": "assistant", "reasoning_content": "I should call get_weather.", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
]

# (name, messages, mode, expected pieces). Each piece is a special-token string or plain text; the expected text is
# their concatenation and the expected ids are the special ids and the tokenizer's ids of each plain piece.
VECTORS = [
    # README "Quick Start": thinking mode, system + user -> "...<｜Assistant｜><think>".
    ("quick_start_think_high", [SYSTEM, {"role": "user", "content": "What is 2+2?"}], "think-high",
     [BOS, "You are a helpful assistant.", USER, "What is 2+2?", ASSISTANT, "<think>"]),
    # README "Basic Chat": chat mode closes the thinking block at once: "<｜Assistant｜></think>"; every assistant
    # turn ends with EOS; no separators between turns (the README's line breaks are for display).
    ("non_think_multi_turn", TWO_TURNS[:4], "non-think",
     [BOS, "You are a helpful assistant.", USER, "Hello", ASSISTANT, "</think>", "Hi there! How can I help you?",
      EOS, USER, "What is the capital of France?", ASSISTANT, "</think>"]),
    # README "Interleaved Thinking Mode": without tools, drop_thinking strips the reasoning of assistant turns
    # before the last user message (those turns look like chat-mode turns), the last turn keeps
    # "<think>{reasoning}</think>{response}<EOS>" (the expected text of that release test).
    ("think_high_drops_earlier_reasoning", TWO_TURNS, "think-high",
     [BOS, "You are a helpful assistant.", USER, "Hello", ASSISTANT, "</think>", "Hi there! How can I help you?",
      EOS, USER, "What is the capital of France?", ASSISTANT, "<think>",
      "The user asks about the capital of France. It is Paris.", "</think>", "The capital of France is Paris.",
      EOS]),
    # README "Reasoning Effort": Think Max = Think High + the fixed prefix right after BOS.
    ("think_max_prefix", [SYSTEM, {"role": "user", "content": "What is 2+2?"}], "think-max",
     [BOS, MAX_PREFIX + "You are a helpful assistant.", USER, "What is 2+2?", ASSISTANT, "<think>"]),
    # Think Max without a system message: the prefix still comes first, before "<｜User｜>".
    ("think_max_no_system", [{"role": "user", "content": "solve it"}], "think-max",
     [BOS, MAX_PREFIX, USER, "solve it", ASSISTANT, "<think>"]),
    # Reasoning in non-think mode is never rendered.
    ("non_think_ignores_reasoning", [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "reasoning_content": "secret", "content": "Hello."}],
     "non-think", [BOS, USER, "Hi", ASSISTANT, "</think>", "Hello.", EOS]),
    # README "Tool Calling": tools on the system message append "\n\n" + the tool block; a tool call is
    # "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=...>\n<params, one per line>\n</｜DSML｜invoke>\n
    # </｜DSML｜tool_calls>" after the content, then EOS; string values raw with string="true", others as JSON with
    # string="false"; a tool result is "<tool_result>...</tool_result>" inside a user turn; with tools, every
    # turn keeps its reasoning and the generation prompt opens <think>.
    ("think_high_tool_call_and_result", TOOL_CONVERSATION, "think-high",
     [BOS, "You are a helpful assistant.\n\n" + TOOLS_BLOCK.replace(
         "{schemas}", json.dumps(WEATHER_TOOL["function"], ensure_ascii=False)), USER,
      "What's the weather in Beijing?", ASSISTANT, "<think>", "I should call get_weather.", "</think>",
      "\n\n<", D, "tool_calls>\n<", D, 'invoke name="get_weather">\n<', D,
      'parameter name="location" string="true">Beijing</', D, 'parameter>\n<', D,
      'parameter name="days" string="false">3</', D, "parameter>\n</", D, "invoke>\n</", D, "tool_calls>", EOS,
      USER, '<tool_result>{"temperature": 22}</tool_result>', ASSISTANT, "<think>"]),
    # Several results of one turn are joined by "\n\n" and sorted by the order of the calls (by tool_call_id);
    # a call without arguments has an empty parameter line.
    ("tool_results_sorted_by_call_order", [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "b", "type": "function", "function": {"name": "second_tool", "arguments": "{}"}},
            {"id": "a", "type": "function", "function": {"name": "first_tool", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "first result"},
        {"role": "tool", "tool_call_id": "b", "content": "second result"}], "non-think",
     [BOS, "\n\n<", D, 'tool_calls>\n<', D, 'invoke name="second_tool">\n\n</', D, 'invoke>\n<', D,
      'invoke name="first_tool">\n\n</', D, "invoke>\n</", D, "tool_calls>", EOS, USER,
      "<tool_result>second result</tool_result>\n\n<tool_result>first result</tool_result>", ASSISTANT,
      "</think>"]),
    # A latest_reminder message is "<｜latest_reminder｜>" + content.
    ("latest_reminder", [SYSTEM, {"role": "latest_reminder", "content": "2026-02-21, Saturday"},
                         {"role": "user", "content": "Hi"}], "think-high",
     [BOS, "You are a helpful assistant.", chat.LATEST_REMINDER, "2026-02-21, Saturday", USER, "Hi", ASSISTANT,
      "<think>"]),
]


def _expected_ids(pieces):
    tok = get_tokenizer()
    ids = []
    for piece in pieces:
        if piece in chat.SPECIAL_TOKEN_IDS:
            ids.append(chat.SPECIAL_TOKEN_IDS[piece])
        else:
            ids.extend(tok.encode(piece).tolist())
    return ids


@pytest.mark.parametrize("name,messages,mode,pieces", VECTORS, ids=[v[0] for v in VECTORS])
def test_encoding_matches_the_specification_text_and_token_ids(name, messages, mode, pieces):
    assert chat.encode(messages, mode) == "".join(pieces)
    ids = chat.token_ids(messages, mode)
    assert ids.dtype == np.int32
    assert ids.tolist() == _expected_ids(pieces)


def test_special_tokens_are_single_ids_of_the_real_tokenizer():
    tok = chat._chat_tokenizer()
    for text, token_id in chat.SPECIAL_TOKEN_IDS.items():
        assert tok.token_to_id(text) == token_id
        assert chat.token_ids([{"role": "user", "content": "x"}, {"role": "assistant", "content": text}],
                              "non-think").tolist().count(token_id) >= 1


def test_generation_prompt_ends_each_mode():
    messages = [{"role": "user", "content": "Hi"}]
    assert chat.encode(messages).endswith(ASSISTANT + "</think>")  # default mode is non-think
    assert chat.encode(messages, "think-high").endswith(ASSISTANT + "<think>")
    assert chat.encode(messages, "think-max").endswith(ASSISTANT + "<think>")
    # A conversation ending with an assistant turn is encoded whole, ending with its EOS (for SFT).
    assert chat.encode(TWO_TURNS, "think-high").endswith(EOS)


def test_drop_thinking_false_keeps_earlier_reasoning():
    text = chat.encode(TWO_TURNS, "think-high", drop_thinking=False)
    assert (USER + "Hello" + ASSISTANT + "<think>The user said hello, I should greet back.</think>Hi there! How can "
            "I help you?" + EOS) in text


def test_parse_reads_back_what_encode_writes():
    # README "Quick Start" parse example.
    assert chat.parse("Simple arithmetic.</think>2 + 2 = 4." + EOS, mode="think-high") == {
        "role": "assistant", "reasoning_content": "Simple arithmetic.", "content": "2 + 2 = 4.", "tool_calls": []}
    assert chat.parse("Paris." + EOS, mode="non-think")["content"] == "Paris."
    for mode in chat.MODES:
        prompt = chat.encode(TOOL_CONVERSATION[:2], mode)
        full = chat.encode(TOOL_CONVERSATION[:3], mode)
        assert full.startswith(prompt)
        msg = chat.parse(full[len(prompt):], mode)
        assert msg["reasoning_content"] == ("I should call get_weather." if mode != "non-think" else "")
        assert msg["content"] == ""
        (call,) = msg["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"location": "Beijing", "days": 3}
    no_args = ("\n\n<" + D + "tool_calls>\n<" + D + 'invoke name="f">\n\n</' + D + "invoke>\n</" + D + "tool_calls>"
               + EOS)
    assert chat.parse(no_args)["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]


@pytest.mark.parametrize("text,mode", [
    ("no end of sentence", "non-think"),                       # truncated
    ("Paris." + EOS + "more", "non-think"),                    # text after EOS
    ("reasoning never closed" + EOS, "think-high"),             # think mode needs </think>
    ("a</think>b" + EOS, "non-think"),                          # special token inside content
    ("x\n\n<" + D + "tool_calls>\n<" + D + 'invoke name="f">\n', "non-think"),                  # truncated call
    ("x\n\n<" + D + "tool_calls>\n<" + D + 'invoke name="f">\n<' + D + 'parameter name="a" string="maybe">1</'
     + D + "parameter>\n</" + D + "invoke>\n</" + D + "tool_calls>" + EOS, "non-think"),       # bad string flag
])
def test_parse_rejects_malformed_completions(text, mode):
    with pytest.raises(ValueError, match="malformed") as e:
        chat.parse(text, mode)
    assert "\n" not in str(e.value)


def test_loss_mask_covers_assistant_turns():
    ids, mask = chat.token_ids_and_loss_mask(TWO_TURNS, "think-high")
    tok = get_tokenizer()
    trained = tok.decode(ids[mask])
    # Both answers with their EOS; the last turn's reasoning and </think>; no prompt tokens.
    assert trained == ("Hi there! How can I help you?" + EOS + "The user asks about the capital of France. It is "
                       "Paris.</think>The capital of France is Paris." + EOS)
    ids2, mask2 = chat.token_ids_and_loss_mask(TWO_TURNS, "think-high", include_reasoning=False)
    assert np.array_equal(ids, ids2)
    assert tok.decode(ids2[mask2]) == "Hi there! How can I help you?" + EOS + "The capital of France is Paris." + EOS
    # Tool calls are trained, tool results are not.
    ids3, mask3 = chat.token_ids_and_loss_mask(TOOL_CONVERSATION, "non-think")
    trained3 = tok.decode(ids3[mask3])
    assert trained3.startswith("\n\n<" + D + "tool_calls>") and trained3.endswith(EOS) and "temperature" not in trained3


@pytest.mark.parametrize("messages,mode,match", [
    ([{"role": "user", "content": "x"}], "think", "unknown chat mode"),
    ([{"role": "robot", "content": "x"}], "non-think", "unknown role"),
    ([{"role": "developer", "content": "x"}], "non-think", "unknown role"),
    ([], "non-think", "non-empty list"),
    ("hello", "non-think", "non-empty list"),
    (["hello"], "non-think", "not a dict"),
    ([{"role": "user"}], "non-think", "content must be a str"),
    ([{"role": "user", "content": ["a"]}], "non-think", "content must be a str"),
    ([{"role": "user", "content": "x", "tools": [WEATHER_TOOL]}], "non-think", "system message"),
    ([{"role": "user", "content": "x", "task": "action"}], "non-think", "not supported"),
    ([{"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}],
     "non-think", "JSON string"),
    ([{"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
     "non-think", "JSON object"),
    ([{"role": "system", "content": "x", "tools": [{"name": "f"}]}], "non-think", "tools must be"),
])
def test_bad_input_gives_one_line_value_error(messages, mode, match):
    with pytest.raises(ValueError, match=match) as e:
        chat.encode(messages, mode)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown chat mode"):
        chat.parse("x" + EOS, mode="max")
