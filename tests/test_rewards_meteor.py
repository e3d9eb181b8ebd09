"""METEOR: one tokenizer, values equal to NLTK's meteor_score, and the caption_meteor reward."""

import pickle

import pytest
from nltk.translate.meteor_score import meteor_score

from sa2va_trl.rewards import CaptionMeteor, RewardInputError, get_reward, load_wordnet, meteor, meteor_tokens, tokenize


@pytest.fixture(scope="module")
def wordnet():
    return load_wordnet()


PAIRS = [
    # (hypothesis, references) as token lists
    (["the", "puppy", "is", "running", "on", "the", "grass"], [["a", "dog", "runs", "on", "grass"]]),
    (["a", "large", "red", "square", "in", "the", "top", "left"], [["a", "big", "red", "square", "at", "the", "top", "left"]]),
    (["a", "small", "circle"], [["a", "large", "blue", "triangle"], ["the", "small", "circles", "in", "the", "center"]]),
    (["nothing", "matches"], [["a", "red", "square"]]),
    ([], [["a", "red", "square"]]),
    (["the", "cars", "were", "driving", "quickly"], [["a", "car", "drives", "fast"]]),
]


@pytest.mark.parametrize("hypothesis, references", PAIRS)
def test_meteor_equals_nltk_meteor_score(wordnet, hypothesis, references):
    expected = meteor_score(references, hypothesis, wordnet=wordnet)
    assert meteor_tokens(hypothesis, references) == expected
    assert meteor_tokens(hypothesis, references, wordnet=wordnet) == expected


def test_meteor_known_value_offline():
    # /work/shared/notes/environment.md: WordNet synonyms (puppy~dog) and stems (runs~running) count.
    value = meteor("The puppy is running on the grass.", "A dog runs on grass")
    assert value == pytest.approx(0.4914529914529914, abs=1e-15)


def test_meteor_parameters_pass_through(wordnet):
    hyp, refs = PAIRS[1]
    assert meteor_tokens(hyp, refs, alpha=0.5, beta=2.0, gamma=0.3) == meteor_score(
        refs, hyp, wordnet=wordnet, alpha=0.5, beta=2.0, gamma=0.3
    )


def test_tokenize_lowercases_and_splits_on_punctuation():
    assert tokenize("A Red SQUARE, top-left!") == ["a", "red", "square", "top", "left"]
    assert tokenize("It's the dog's  bowl\n(blue)") == ["it's", "the", "dog's", "bowl", "blue"]
    assert tokenize("snake_case 3 cats") == ["snake", "case", "3", "cats"]
    assert tokenize("") == []


def test_caption_meteor_reward_on_strings_chat_messages_and_missing_references():
    reward = get_reward("caption_meteor")
    completions = [
        "The puppy is running on the grass.",
        [{"role": "assistant", "content": "The puppy is running on the grass."}],
        [{"role": "assistant", "content": [{"type": "text", "text": "The puppy is running"}, {"type": "text", "text": "on the grass."}]}],
        "a dog runs on grass",
        "anything",
    ]
    captions = ["A dog runs on grass", "A dog runs on grass", "A dog runs on grass", ["a cat", "a dog runs on grass"], None]
    out = reward(prompts=["p"] * 5, completions=completions, completion_ids=[[0]] * 5, caption=captions)
    expected = meteor_tokens(tokenize(completions[0]), [tokenize(captions[0])])
    assert out[:3] == [expected] * 3
    assert out[3] == meteor("a dog runs on grass", ["a cat", "a dog runs on grass"])
    assert out[3] > 0.99  # best of the references
    assert out[4] is None


def test_caption_meteor_applies_only_to_caption_rows_when_a_task_column_exists():
    reward = CaptionMeteor()
    out = reward(prompts=["p"] * 3, completions=["a dog", "Sure.", "a dog"], completion_ids=[[0]] * 3,
                 caption=["a dog"] * 3, task=["mask_to_caption", "caption_to_mask", None])
    assert out[0] == out[2] and out[0] > 0.9 and out[1] is None
    every_task = CaptionMeteor(tasks=None)
    assert every_task(prompts=["p"], completions=["Sure."], completion_ids=[[0]], caption=["a dog"],
                      task=["caption_to_mask"]) == [0.0]


def test_caption_meteor_custom_column_and_empty_completion():
    reward = CaptionMeteor(reference_column="description")
    assert reward(prompts=["p"], completions=[""], completion_ids=[[]], description=["a dog"]) == [0.0]


@pytest.mark.parametrize(
    "caption, fragment",
    [("", "the reference caption is empty"), ([], "the reference caption is empty"), ("...", "has no words"),
     (3, "must be a str or a list of str")],
)
def test_caption_meteor_bad_reference_names_row_and_field(caption, fragment):
    reward = get_reward("caption_meteor")
    with pytest.raises(RewardInputError) as info:
        reward(prompts=["p"] * 2, completions=["a", "b"], completion_ids=[[0]] * 2, caption=["a dog", caption])
    assert info.value.row == 1 and info.value.field == "caption" and info.value.reward == "caption_meteor"
    assert fragment in str(info.value)


def test_caption_meteor_bad_completion_and_missing_column():
    reward = get_reward("caption_meteor")
    with pytest.raises(RewardInputError, match=r"row 0, field 'completions': a completion must be a str"):
        reward(prompts=["p"], completions=[42], completion_ids=[[0]], caption=["a dog"])
    with pytest.raises(RewardInputError, match=r"needs the column 'caption'"):
        reward(prompts=["p"], completions=["a dog"], completion_ids=[[0]])


def test_caption_meteor_pickles_with_its_name_and_options():
    reward = CaptionMeteor(reference_column="ref", alpha=0.8)
    clone = pickle.loads(pickle.dumps(reward))
    assert clone.__name__ == "caption_meteor" and clone.reference_column == "ref" and clone.scorer.alpha == 0.8
    assert clone(prompts=["p"], completions=["a dog"], completion_ids=[[0]], ref=["a dog"]) == reward(
        prompts=["p"], completions=["a dog"], completion_ids=[[0]], ref=["a dog"]
    )
