"""Intent rules (farm/intents.py): loading, validation, Korean matching, the matcher."""

from __future__ import annotations

import json
import tomllib
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from farm.intents import (
    MAX_INTENTS,
    MAX_PATTERN_CHARS,
    MAX_PHRASE_CHARS,
    MAX_PHRASES,
    MAX_TEXT_CHARS,
    Intent,
    IntentMatch,
    IntentMatcher,
    IntentRules,
    IntentsError,
    check_pattern,
    normalize,
)


EXAMPLE = Path(__file__).parent.parent / "deploy" / "intents" / "ko-example.toml"
RULES = IntentRules.load(EXAMPLE)


def rules(**intents: dict[str, list[str]]) -> IntentRules:
    return IntentRules.from_mapping({"language": "ko", "intents": intents})


def name(text: str) -> str | None:
    found = RULES.match(text)
    return None if found is None else found.name


class TestLoading:
    def test_example_file_loads_its_eight_intents_in_file_order(self) -> None:
        assert RULES.language == "ko"
        assert RULES.names == ("yes", "no", "callback", "stop", "wrong_person", "busy", "who_is_this", "hold_on")
        assert "네 맞아요" in RULES.intents[0].examples

    def test_json_file_loads_the_same_rules_as_the_toml_file(self, tmp_path: Path) -> None:
        path = tmp_path / "ko.json"
        path.write_text(json.dumps(tomllib.loads(EXAMPLE.read_text()), ensure_ascii=False))
        assert IntentRules.load(path) == RULES

    def test_dialer_json_object_builds_rules(self) -> None:
        raw = json.dumps({"intents": {"yes": {"phrases": ["네"]}, "no": {"patterns": ["아니[요오]"]}}})
        built = IntentRules.from_json(raw.encode())
        assert built.names == ("yes", "no")
        assert built.language == ""
        assert name_of(built, "아니오") == "no"

    def test_file_with_another_suffix_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "ko.yaml"
        path.write_text("intents: {}")
        with pytest.raises(IntentsError, match=r"has suffix '\.yaml', expected '\.toml' or '\.json'"):
            IntentRules.load(path)

    def test_toml_that_does_not_parse_is_refused_naming_the_file(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.toml"
        path.write_text("[intents.yes\nphrases = 1")
        with pytest.raises(IntentsError, match=r"intents file '.*bad\.toml': intents TOML does not parse"):
            IntentRules.load(path)

    def test_json_that_does_not_parse_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.json"
        path.write_text("{")
        with pytest.raises(IntentsError, match="intents JSON does not parse"):
            IntentRules.load(path)

    def test_malformed_file_is_refused_naming_the_file_and_the_intent(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.toml"
        path.write_text('[intents.yes]\nphrases = ["네"]\nphrase = ["예"]\n')
        with pytest.raises(IntentsError, match=r"bad\.toml': intent 'yes': unknown key 'phrase'"):
            IntentRules.load(path)

    def test_lists_given_directly_become_tuples(self) -> None:
        built = IntentRules([Intent("yes", ["네"])])  # type: ignore[arg-type]
        assert built.intents[0].phrases == ("네",)


def name_of(built: IntentRules, text: str) -> str | None:
    found = built.match(text)
    return None if found is None else found.name


MALFORMED = [
    ({"intents": {"yes": {"phrases": ["네"]}}, "campaign": "x"}, "unknown key 'campaign'"),
    ({"language": "ko"}, "intents is NoneType, expected a table of intents"),
    ({"language": 7, "intents": {"yes": {"phrases": ["네"]}}}, "language is int, expected a string"),
    ({"intents": {}}, "intents has no intent"),
    ({"intents": {"yes": ["네"]}}, "intent 'yes' is list, expected a table"),
    ({"intents": {"yes": {"phrases": ["네"], "regex": ["x"]}}}, "intent 'yes': unknown key 'regex'"),
    ({"intents": {"yes": {"phrases": "네"}}}, "intent 'yes': phrases is str, expected a list of strings"),
    ({"intents": {"yes": {"phrases": ["네", 3]}}}, r"intent 'yes': phrases\[1\] is int, expected a string"),
    ({"intents": {"yes": {"examples": ["네"]}}}, "intent 'yes' has no phrases and no patterns"),
    ({"intents": {"yes": {}}}, "intent 'yes' has no phrases and no patterns"),
    ({"intents": {"yes": {"phrases": ["?!"]}}}, r"intent 'yes': phrases\[0\] is empty once normalised"),
    ({"intents": {"Yes": {"phrases": ["네"]}}}, "intent 'Yes': name must be"),
    ({"intents": {"unknown": {"phrases": ["네"]}}}, "intent 'unknown': name must be .* not 'unknown'"),
    ({"intents": {"yes": {"phrases": ["네"]}, "no": {"phrases": ["네 "]}}}, "phrase '네' is in intents 'yes' and 'no'"),
    (
        {"intents": {f"i{k}": {"phrases": [f"말{k}"]} for k in range(MAX_INTENTS + 1)}},
        f"intents has {MAX_INTENTS + 1} intents, expected no more than {MAX_INTENTS}",
    ),
    (
        {"intents": {"yes": {"phrases": [f"네{k}" for k in range(MAX_PHRASES + 1)]}}},
        f"intent 'yes': phrases has {MAX_PHRASES + 1} entries, expected no more than {MAX_PHRASES}",
    ),
    (
        {"intents": {"yes": {"phrases": ["네" * (MAX_PHRASE_CHARS + 1)]}}},
        rf"intent 'yes': phrases\[0\] is {MAX_PHRASE_CHARS + 1} characters, expected no more than {MAX_PHRASE_CHARS}",
    ),
    (
        {"intents": {"busy": {"patterns": ["바" * (MAX_PATTERN_CHARS + 1)]}}},
        rf"intent 'busy': patterns\[0\]: pattern is {MAX_PATTERN_CHARS + 1} characters, expected no more than",
    ),
    ({"intents": {"busy": {"patterns": ["바쁘(다"]}}}, r"intent 'busy': patterns\[0\]: pattern does not compile"),
    (
        {"intents": {"busy": {"patterns": ["(바+)+"]}}},
        "repeats a group holding a quantifier or an alternation at character 4",
    ),
]


class TestMalformed:
    @pytest.mark.parametrize(("mapping", "message"), MALFORMED)
    def test_malformed_mapping_is_refused_with_a_message_naming_the_key(self, mapping: object, message: str) -> None:
        with pytest.raises(IntentsError, match=message):
            IntentRules.from_mapping(mapping)

    def test_document_that_is_not_an_object_is_refused(self) -> None:
        with pytest.raises(IntentsError, match="intents document is list, expected an object"):
            IntentRules.from_json("[]")

    def test_messages_are_lowercase_without_a_final_period(self) -> None:
        for mapping, _ in MALFORMED:
            with pytest.raises(IntentsError) as info:
                IntentRules.from_mapping(mapping)
            message = str(info.value)
            assert message[0].islower() and not message.endswith(".")


class TestPatternSafety:
    @pytest.mark.parametrize(
        ("pattern", "message"),
        [
            ("(a+)+", "repeats a group holding a quantifier or an alternation"),
            ("(?:a*b)+", "repeats a group holding a quantifier or an alternation"),
            ("(a|ab)*c", "repeats a group holding a quantifier or an alternation"),
            ("((a|b)c){2,}", "repeats a group holding a quantifier or an alternation"),
            ("(?:a?){,}b", "repeats a group holding a quantifier or an alternation"),
            (r"(a)x\1", "backreference at character 4"),
            ("(?P<w>a)(?P=w)", "named group or a conditional"),
            ("(a)?(?(1)b|c)", "named group or a conditional"),
            ("(?i)ars", "global inline flags"),
            (".*a.*b", "quantifiers multiply to 4096, expected no more than 256"),
            (r"\w+\s?\w+x", "quantifiers multiply to 8192"),
            ("a{0,9}b{0,9}c{1,9}", "quantifiers multiply to 1000"),
            ("a*", "pattern matches empty text"),
            ("a{99999999999}", "pattern does not compile"),
        ],
    )
    def test_unsafe_pattern_is_refused(self, pattern: str, message: str) -> None:
        with pytest.raises(IntentsError, match=message):
            check_pattern(pattern)

    @pytest.mark.parametrize(
        "pattern",
        [
            "바쁘(다|니까|거든)",
            "(나중|이따|내일|저녁)에? ?(다시 )?(연락|통화)",
            ".*연락",
            "[^]]+x",
            r"[\]a]{2}",
            r"\N{HANGUL SYLLABLE NE}+",
            "(?:ab){2,3}",
            "(?i:ars)",
            "(?<!안 )좋아",
            "a{}",
            "(?#comment)x+",
            "(?>ab)+",
        ],
    )
    def test_safe_pattern_is_accepted(self, pattern: str) -> None:
        check_pattern(pattern)

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet="()[]{}|*+?.\\^$,:=!<>#Pa0123-i", max_size=30))
    def test_checking_any_pattern_raises_nothing_but_intents_error(self, pattern: str) -> None:
        try:
            check_pattern(pattern)
        except IntentsError:
            pass


class TestMatching:
    @pytest.mark.parametrize("text", ["전화 하지 마세요", "전화하지마세요", "전 화하지 마", "앞으로 전화하지 마!"])
    def test_phrase_matches_whatever_the_spacing(self, text: str) -> None:
        assert name(text) == "stop"

    def test_real_vosk_output_with_split_words_matches(self) -> None:
        # tests/data/texts.json, ko_02.wav: Vosk wrote "맞습니다" as "맞 습니다"
        found = RULES.match("네 맞 습니다 잠시 만 기다려 주세요")
        assert found == IntentMatch("yes", "맞 습니다", also=("hold_on",))  # 4 characters beat 3

    @pytest.mark.parametrize("text", ["네이버", "예약 확인 좀", "좋네요", "응급실"])
    def test_one_syllable_phrase_does_not_match_inside_a_word(self, text: str) -> None:
        assert name(text) is None

    @pytest.mark.parametrize("text", ["네", "네, 네.", "예 예", "음 응"])
    def test_one_syllable_phrase_matches_as_a_whole_word(self, text: str) -> None:
        assert name(text) == "yes"

    def test_longer_phrase_matches_inside_a_word(self) -> None:
        assert name("다시전화해 주세요") == "callback"
        assert name("잘못 거셨어요") == "wrong_person"

    def test_latin_phrase_matches_only_as_a_whole_word(self) -> None:
        built = rules(yes={"phrases": ["OK"]})
        assert name_of(built, "ok 알겠어요") == "yes"
        assert name_of(built, "Okay") is None

    def test_decomposed_hangul_matches(self) -> None:
        assert name(unicodedata.normalize("NFD", "아니요")) == "no"

    def test_longest_match_wins(self) -> None:
        assert RULES.match("아니요 괜찮아요") == IntentMatch("no", "괜찮아요")
        assert RULES.match("네 아니요") == IntentMatch("no", "아니요", also=("yes",))

    def test_negated_phrase_outruns_the_plain_one(self) -> None:
        assert RULES.match("별로 안 좋아요") == IntentMatch("no", "안 좋아요", also=("yes",))

    def test_other_intents_that_matched_are_listed_best_first(self) -> None:
        found = RULES.match("네 지금 바빠요 나중에 전화 주세요")
        assert found == IntentMatch("callback", "나중에 전화", also=("busy", "yes"))

    def test_tie_goes_to_the_intent_listed_first(self) -> None:
        built = rules(first={"phrases": ["가나"]}, second={"phrases": ["다라"]})
        assert built.match("다라 가나") == IntentMatch("first", "가나", also=("second",))

    def test_spacing_does_not_change_priority(self) -> None:
        # "나중에 전화" (5 characters) beats "바빠요" (3) even when Vosk spaces it out
        assert name("바빠요 나 중 에 전 화") == "callback"

    def test_patterns_match_the_normalised_text_ignoring_case(self) -> None:
        assert name("지금 바쁘거든요") == "busy"
        assert name("운전중이에요") == "busy"
        built = rules(ars={"patterns": ["ars ?상담"]})
        assert name_of(built, "ARS 상담 연결") == "ars"

    def test_words_past_the_text_cap_are_not_matched(self) -> None:
        assert name("음 " * MAX_TEXT_CHARS + "아니요") is None
        assert len(normalize("가" * 10 * MAX_TEXT_CHARS)) == MAX_TEXT_CHARS

    def test_text_without_intent_matches_nothing(self) -> None:
        assert RULES.match("") is None
        assert RULES.match("암 염화실 노조가 쉼터 입니다") is None

    def test_match_to_dict_holds_the_intent_event_members(self) -> None:
        assert RULES.match("네 아니요").to_dict() == {  # type: ignore[union-attr]
            "intent": "no",
            "matched": "아니요",
            "source": "rules",
            "early": False,
            "also": ["yes"],
            "revised": False,
        }

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=2 * MAX_TEXT_CHARS))
    def test_matching_arbitrary_text_never_raises(self, text: str) -> None:
        found = RULES.match(text)
        assert found is None or found.name in RULES.names
        matcher = IntentMatcher(RULES)
        for cut in range(0, len(text), 7):
            matcher.on_partial(text[:cut])
        matcher.on_final(text)

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_every_phrase_matches_its_intent_with_any_spacing(self, data: st.DataObject) -> None:
        intent = data.draw(st.sampled_from(RULES.intents))
        phrase = data.draw(st.sampled_from(intent.phrases)).replace(" ", "")
        spaced = "".join(c + data.draw(st.sampled_from(["", " ", "  "])) for c in phrase)
        assert name(spaced) == intent.name


class TestMatcher:
    def test_stable_partial_fires_early_with_the_stable_words(self) -> None:
        matcher = IntentMatcher(RULES)
        assert matcher.on_partial("네") is None
        assert matcher.on_partial("네 맞아요") == IntentMatch("yes", "네", early=True)

    def test_partial_that_changes_its_words_does_not_fire(self) -> None:
        matcher = IntentMatcher(RULES)
        assert matcher.on_partial("네") is None
        assert matcher.on_partial("네이버") is None
        assert matcher.on_partial("네이버 맞아요") is None  # "맞아요" is new: not yet stable
        assert matcher.on_partial("네이버 맞아요 그") == IntentMatch("yes", "맞아요", early=True)

    def test_respaced_words_count_as_the_same_place(self) -> None:
        matcher = IntentMatcher(RULES)
        assert matcher.on_partial("전화 하지 마") is None
        assert matcher.on_partial("전화하지 마세요") == IntentMatch("stop", "전화하지 마", early=True)

    def test_partial_whose_best_intent_changed_waits(self) -> None:
        matcher = IntentMatcher(RULES)
        assert matcher.on_partial("네") is None
        assert matcher.on_partial("네 아니요") is None
        assert matcher.on_partial("네 아니요 괜") == IntentMatch("no", "아니요", early=True, also=("yes",))

    def test_partial_without_intent_breaks_stability(self) -> None:
        matcher = IntentMatcher(RULES)
        assert matcher.on_partial("네") is None
        assert matcher.on_partial("음") is None
        assert matcher.on_partial("음 네") is None

    def test_early_match_fires_once_per_utterance(self) -> None:
        matcher = IntentMatcher(RULES)
        matcher.on_partial("아니요")
        assert matcher.on_partial("아니요 괜") is not None
        assert matcher.on_partial("아니요 괜찮아요") is None
        assert matcher.on_partial("아니요 괜찮아요 아니요") is None

    def test_final_that_agrees_with_the_early_match_reports_nothing(self) -> None:
        matcher = IntentMatcher(RULES)
        matcher.on_partial("아니요")
        matcher.on_partial("아니요 괜")
        assert matcher.on_final("아니요 괜찮아요") is None

    def test_final_without_early_match_reports(self) -> None:
        matcher = IntentMatcher(RULES)
        assert matcher.on_partial("누구") is None
        assert matcher.on_final("누구세요") == IntentMatch("who_is_this", "누구세요")

    def test_final_that_contradicts_the_early_match_revises_it(self) -> None:
        matcher = IntentMatcher(RULES)
        matcher.on_partial("네")
        assert matcher.on_partial("네 네") is not None
        assert matcher.on_final("네 네 아니요 관심 없어요") == IntentMatch(
            "no", "관심 없어요", also=("yes",), revised=True
        )

    def test_final_without_rule_match_leaves_the_early_match_standing(self) -> None:
        matcher = IntentMatcher(RULES)
        matcher.on_partial("네")
        assert matcher.on_partial("네 그") is not None
        assert matcher.on_final("내 그 거") is None

    def test_final_ends_the_utterance(self) -> None:
        matcher = IntentMatcher(RULES)
        matcher.on_partial("네")
        matcher.on_partial("네 네")
        assert matcher.on_final("네 네") is None
        assert matcher.on_partial("아니요") is None
        assert matcher.on_partial("아니요 아니요") == IntentMatch("no", "아니요", early=True)
        assert matcher.on_final("바빠요") == IntentMatch("busy", "바빠요", revised=True)
        assert matcher.on_final("바빠요") == IntentMatch("busy", "바빠요")

    def test_reset_starts_a_new_utterance(self) -> None:
        matcher = IntentMatcher(RULES)
        matcher.on_partial("네")
        assert matcher.on_partial("네 네") is not None
        matcher.reset()
        assert matcher.on_partial("네 네") is None
        assert matcher.on_partial("네 네 네") == IntentMatch("yes", "네", early=True)
        matcher.reset()
        assert matcher.on_final("네") == IntentMatch("yes", "네")
