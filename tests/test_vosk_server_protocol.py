"""farm.protocol.vosk_server at message level, no sockets.

The expected strings are vosk-api 0.3.45's own output (``KaldiRecognizer.Result()``,
``PartialResult()``, ``FinalResult()`` on tests/data/ko_02_8k.wav), so a reply that
farm prints is byte for byte one vosk-server could have sent.
"""

from __future__ import annotations

import pytest

from farm.protocol import vosk_server as vs


WORDS = [
    {"word": "내", "start_ms": 0, "end_ms": 150, "conf": 1.0},
    {"word": "말을", "start_ms": 150, "end_ms": 360, "conf": 0.508689},
]

# vosk-api, SetWords(True): Result() of an utterance (first two words kept).
VOSK_RESULT = (
    '{\n  "result" : [{\n      "conf" : 1.000000,\n      "end" : 0.150000,\n      "start" : 0.000000,\n'
    '      "word" : "내"\n    }, {\n      "conf" : 0.508689,\n      "end" : 0.360000,\n'
    '      "start" : 0.150000,\n      "word" : "말을"\n    }],\n  "text" : "내 말을"\n}'
)
VOSK_TEXT_ONLY = '{\n  "text" : "내 말을"\n}'
VOSK_PARTIAL = '{\n  "partial" : "내 마을"\n}'
VOSK_ALTERNATIVE = (
    '{\n  "alternatives" : [{\n      "confidence" : 1.000000,\n      "result" : [{\n          "end" : 0.150000,\n'
    '          "start" : 0.000000,\n          "word" : "내"\n        }, {\n          "end" : 0.360000,\n'
    '          "start" : 0.150000,\n          "word" : "말을"\n        }],\n      "text" : "내 말을"\n    }]\n}'
)


class TestReplyFormat:
    def test_a_partial_is_printed_as_vosk_api_prints_it(self) -> None:
        assert vs.format_partial("내 마을") == VOSK_PARTIAL

    def test_a_result_with_words_is_printed_as_vosk_api_prints_it(self) -> None:
        assert vs.format_result("내 말을", WORDS, vs.VoskConfig()) == VOSK_RESULT

    def test_a_result_without_words_has_text_only(self) -> None:
        assert vs.format_result("내 말을", WORDS, vs.VoskConfig(words=False)) == VOSK_TEXT_ONLY

    def test_an_empty_result_has_no_result_member(self) -> None:
        assert vs.format_result("", [], vs.VoskConfig()) == '{\n  "text" : ""\n}'

    def test_alternatives_carry_words_without_conf(self) -> None:
        # vosk-api's confidence is a lattice score; farm has one hypothesis, said with 1.0.
        assert vs.format_result("내 말을", WORDS, vs.VoskConfig(max_alternatives=3)) == VOSK_ALTERNATIVE

    def test_alternatives_without_words_have_no_result_member(self) -> None:
        out = vs.format_result("내 말을", WORDS, vs.VoskConfig(words=False, max_alternatives=1))
        assert out == '{\n  "alternatives" : [{\n      "confidence" : 1.000000,\n      "text" : "내 말을"\n    }]\n}'

    def test_strings_are_escaped_as_simplejson_does_and_utf8_stays(self) -> None:
        assert vs.format_partial('a"b\\c\n\t\b\f\r é') == '{\n  "partial" : "a\\"b\\\\c\\n\\t\\b\\f\\r é"\n}'

    @pytest.mark.parametrize(
        "value, printed",
        [({}, "{}"), ([], "[]"), (True, "true"), (False, "false"), (3, "3"), (None, "null"), (0.5, "0.500000")],
    )
    def test_dump_prints_scalars_and_empty_containers(self, value: object, printed: str) -> None:
        assert vs.dump(value) == printed


class TestTextMessages:
    @pytest.mark.parametrize("text", ['{"eof" : 1}', '{"eof": 1}', '{ "eof" : true }'])
    def test_eof_in_any_spacing(self, text: str) -> None:
        assert vs.parse_text(text) == (vs.EOF, None)

    def test_reset(self) -> None:
        assert vs.parse_text('{"reset" : 1}') == (vs.RESET, None)

    def test_config_as_test_words_py_sends_it(self) -> None:
        text = """{"config" :
                    { "phrase_list" : ["zero one two three four five", "six seven eight nine oh"],
                      "sample_rate" : 16000,
                      "words" : 0}}"""
        session = vs.VoskSession()
        assert session.receive_text(text) is vs.CONFIG
        cfg = session.config
        assert (cfg.sample_rate, cfg.words, cfg.max_alternatives) == (16000, False, 0)
        assert cfg.phrase_list == ["zero one two three four five", "six seven eight nine oh"]

    def test_config_defaults_are_vosk_servers(self) -> None:
        cfg = vs.VoskConfig()
        assert (cfg.sample_rate, cfg.words, cfg.max_alternatives, cfg.phrase_list) == (8000, True, 0, None)

    def test_config_with_float_rate_and_alternatives(self) -> None:
        session = vs.VoskSession()
        session.receive_text('{"config" : { "max_alternatives" : 20, "sample_rate" : 16000.0 } }')
        assert (session.config.sample_rate, session.config.max_alternatives) == (16000, 20)

    def test_config_members_farm_cannot_honour_are_kept_for_one_log_line(self) -> None:
        session = vs.VoskSession()
        session.receive_text('{"config": {"model": "/m", "num_channels": 1, "sample_rate": 8000}}')
        assert session.config.ignored == ["model", "num_channels"]

    def test_config_after_audio_is_ignored_as_vosk_server_does(self) -> None:
        session = vs.VoskSession()
        session.receive_audio()
        assert session.receive_text('{"config": {"sample_rate": 16000, "words": 0}}') is vs.CONFIG
        assert (session.config.sample_rate, session.config.words) == (8000, True)

    @pytest.mark.parametrize(
        "text, code, says",
        [
            ('{"config": {"sample_rate": 8000', vs.CLOSE_INVALID, "not JSON"),
            ("EOF", vs.CLOSE_INVALID, "not JSON"),
            ("[1]", vs.CLOSE_INVALID, "not a JSON object"),
            ('{"hello": 1}', vs.CLOSE_UNSUPPORTED, "neither config, eof nor reset (members: hello)"),
            ('{"eof": 0}', vs.CLOSE_UNSUPPORTED, "neither config"),
            ('{"config": 5}', vs.CLOSE_UNSUPPORTED, "config is not a JSON object"),
            ('{"config": {"sample_rate": 11025}}', vs.CLOSE_UNSUPPORTED, "unsupported sample rate 11025"),
            ('{"config": {"sample_rate": 8000.5}}', vs.CLOSE_UNSUPPORTED, "unsupported sample rate 8000.5"),
            ('{"config": {"sample_rate": "fast"}}', vs.CLOSE_UNSUPPORTED, "'fast' is not a number"),
            ('{"config": {"sample_rate": null}}', vs.CLOSE_UNSUPPORTED, "is not a number"),
            ('{"config": {"max_alternatives": "x"}}', vs.CLOSE_UNSUPPORTED, "max_alternatives 'x' is not a number"),
            ('{"config": {"max_alternatives": -1}}', vs.CLOSE_UNSUPPORTED, "max_alternatives -1 is negative"),
        ],
    )
    def test_bad_messages_close_with_a_code_and_reason(self, text: str, code: int, says: str) -> None:
        with pytest.raises(vs.VoskServerError) as exc:
            vs.VoskSession().receive_text(text)
        assert exc.value.code == code and says in str(exc.value)

    def test_a_phrase_list_that_is_not_a_list_is_dropped(self) -> None:
        session = vs.VoskSession()
        session.receive_text('{"config": {"phrase_list": "yes no"}}')
        assert session.config.phrase_list is None


class TestReplies:
    def test_audio_gets_the_empty_partial_before_anything_is_recognized(self) -> None:
        session = vs.VoskSession()
        session.receive_audio()
        assert session.audio_reply() == '{\n  "partial" : ""\n}'

    def test_audio_gets_the_latest_partial(self) -> None:
        session = vs.VoskSession()
        session.receive_event("partial", {"text": "내"})
        session.receive_event("partial", {"text": "내 마을"})
        session.receive_event("speech_start", {})
        session.receive_audio()
        assert session.audio_reply() == VOSK_PARTIAL
        assert session.audio_reply() == VOSK_PARTIAL

    def test_finals_go_out_one_per_audio_reply_then_the_partial_again(self) -> None:
        session = vs.VoskSession()
        session.receive_event("partial", {"text": "내 마을"})
        session.receive_event("final", {"text": "내 말을", "words": WORDS, "reason": "endpoint"})
        session.receive_event("final", {"text": "네", "words": [], "reason": "endpoint"})
        session.receive_audio()
        assert session.audio_reply() == VOSK_RESULT
        assert session.audio_reply() == '{\n  "text" : "네"\n}'
        assert session.audio_reply() == '{\n  "partial" : ""\n}'

    def test_eof_without_audio_gets_vosk_apis_compact_empty_result(self) -> None:
        assert vs.VoskSession().final_reply() == '{"text": ""}'

    def test_eof_without_audio_with_alternatives_gets_their_compact_empty_form(self) -> None:
        session = vs.VoskSession()
        session.receive_text('{"config": {"max_alternatives": 2}}')
        assert session.final_reply() == '{"alternatives" : [{"text": "", "confidence" : 1.0}] }'

    def test_eof_after_audio_with_no_words_gets_an_empty_result(self) -> None:
        session = vs.VoskSession()
        session.receive_audio()
        session.receive_event("final", {"text": "", "words": []})
        assert session.final_reply() == '{\n  "text" : ""\n}'

    def test_eof_joins_every_final_no_reply_carried(self) -> None:
        session = vs.VoskSession()
        session.receive_audio()
        session.receive_event("final", {"text": "내", "words": WORDS[:1]})
        session.receive_event("final", {"text": "", "words": []})
        session.receive_event("final", {"text": "말을", "words": WORDS[1:]})
        session.receive_event("partial", {"text": "dangling"})
        assert session.final_reply() == VOSK_RESULT
        assert session.partial == "" and not session.finals

    def test_eof_right_after_a_result_went_out_gets_the_compact_empty_result(self) -> None:
        session = vs.VoskSession()
        session.receive_audio()
        session.receive_event("final", {"text": "내 말을", "words": WORDS})
        assert session.audio_reply() == VOSK_RESULT
        assert session.final_reply() == '{"text": ""}'

    def test_reset_gets_the_final_reply_and_the_stream_goes_on(self) -> None:
        session = vs.VoskSession()
        session.receive_audio()
        session.receive_event("final", {"text": "내 말을", "words": WORDS})
        assert session.receive_text('{"reset" : 1}') is vs.RESET
        assert session.final_reply() == VOSK_RESULT
        session.receive_audio()
        assert session.audio_reply() == '{\n  "partial" : ""\n}'

    def test_final_words_that_are_not_objects_are_skipped(self) -> None:
        session = vs.VoskSession()
        session.receive_event("final", {"text": "내", "words": ["junk", WORDS[0]]})
        assert session.finals[0][1] == [WORDS[0]]
