"""Idea files as users write them: JSON, TOML, YAML, one idea or a list, and AI-Scientist idea lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.spec import IdeaSpec, SpecError, load_idea, load_ideas

IDEAS = Path(__file__).parent / "data" / "ideas"


def one_line(err: pytest.ExceptionInfo[SpecError]) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


# ------------------------------------------------------------------------------------------------- good files


@pytest.mark.parametrize("file", ["single.json", "single.toml", "single.yaml"])
def test_single_idea_reads_the_same_in_every_format(file: str) -> None:
    idea = load_idea(IDEAS / file)
    assert idea.name == "wider_dictionary"
    assert idea.title == "A Wider Dictionary"
    assert idea.experiment == "Double the number of latents and halve the L1 coefficient."
    assert idea.plan == "Run 1: 2x latents. Run 2: 4x latents."
    assert idea.template == "sae"
    assert idea.max_runs == 3
    assert idea.extra == {"owner": "ana"}


def test_ai_scientist_seed_ideas_load_as_they_are() -> None:
    ideas = load_ideas(IDEAS / "seed_ideas.json")
    assert [i.name for i in ideas] == ["median_mad_sae", "topk_warmup", "dead_latent_resampling"]
    first = ideas[0]
    assert first.title.startswith("Median/MAD Normalisation")
    assert "median absolute deviation" in first.experiment
    assert first.extra == {"Interestingness": 6, "Feasibility": 9, "Novelty": 5}
    assert first.plan is None and first.template is None and first.max_runs is None


def test_ai_scientist_technical_details_become_the_plan() -> None:
    idea = load_idea(IDEAS / "generated_ideas.json")
    assert idea.plan is not None and idea.plan.startswith("Use torch.optim.lr_scheduler.CosineAnnealingLR")
    assert idea.extra["novel"] is False
    assert "Technical_Details" not in idea.extra


def test_toml_array_of_ideas_and_name_from_title() -> None:
    ideas = load_ideas(IDEAS / "list.toml")
    assert [i.name for i in ideas] == ["tied_encoder_and_decoder_weights", "no_bias"]
    assert ideas[1].max_runs == 2


def test_yaml_list_mixing_ai_scientist_and_our_keys() -> None:
    ideas = load_ideas(IDEAS / "list.yml")
    assert [i.name for i in ideas] == ["tied_weights", "no_bias"]
    assert ideas[0].plan == "One run with tied weights, one with tied weights and a learned scale."


def test_choose_by_name_or_by_the_name_as_written() -> None:
    assert load_idea(IDEAS / "seed_ideas.json", "topk_warmup").title == "Warming Up the TopK Constraint"
    # The file says "Dead Latent Resampling"; the slug and the original spelling both find it.
    assert load_idea(IDEAS / "seed_ideas.json", "dead_latent_resampling").name == "dead_latent_resampling"
    assert load_idea(IDEAS / "seed_ideas.json", "Dead Latent Resampling").name == "dead_latent_resampling"


def test_names_become_slugs_of_at_most_64_characters(tmp_path: Path) -> None:
    f = tmp_path / "idea.json"
    f.write_text(json.dumps({"title": "Ünïcode & Spaces: " + "x" * 100, "experiment": "e"}))
    name = load_idea(f).name
    assert len(name) <= 64
    assert name.startswith("n_code_spaces_x")
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-")


def test_spec_saved_by_a_session_loads_back_equal(tmp_path: Path) -> None:
    idea = load_idea(IDEAS / "seed_ideas.json", "median_mad_sae")
    saved = tmp_path / "idea.json"
    saved.write_text(idea.model_dump_json(indent=2))
    assert load_idea(saved) == idea


def test_idea_spec_is_frozen_and_validates_when_built_directly() -> None:
    idea = IdeaSpec(title="Hello World", experiment="try")
    assert idea.name == "hello_world"
    with pytest.raises(ValidationError):
        idea.experiment = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        IdeaSpec(title="t", experiment="e", max_runs=0)


# -------------------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        load_idea(tmp_path / "nope.json")
    assert "nope.json" in one_line(err) and "not found" in str(err.value)


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "idea.json"
    f.write_text('{\n  "title": "t",\n  "experiment": "e"\n  "plan": "p"\n}\n')
    with pytest.raises(SpecError) as err:
        load_idea(f)
    msg = one_line(err)
    assert str(f) in msg and "invalid JSON" in msg and "line 4" in msg


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "idea.yaml"
    f.write_text("title: t\nexperiment: e\nplan: [unclosed\n")
    with pytest.raises(SpecError) as err:
        load_idea(f)
    msg = one_line(err)
    assert "invalid YAML" in msg and "line" in msg


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "idea.toml"
    f.write_text('title = "t"\nexperiment = \n')
    with pytest.raises(SpecError) as err:
        load_idea(f)
    assert "invalid TOML" in one_line(err) and "line 2" in str(err.value)


def test_missing_experiment_names_the_idea(tmp_path: Path) -> None:
    f = tmp_path / "ideas.json"
    f.write_text(
        json.dumps([{"Name": "ok", "Title": "t", "Experiment": "e"}, {"Name": "broken", "Title": "t"}])
    )
    with pytest.raises(SpecError) as err:
        load_ideas(f)
    msg = one_line(err)
    assert "idea 2" in msg and "broken" in msg and "experiment" in msg


def test_max_runs_over_ten_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "idea.toml"
    f.write_text('title = "t"\nexperiment = "e"\nmax_runs = 11\n')
    with pytest.raises(SpecError) as err:
        load_idea(f)
    assert "max_runs" in one_line(err) and "at most 10" in str(err.value)


def test_unknown_idea_name_lists_the_names_available() -> None:
    with pytest.raises(SpecError) as err:
        load_idea(IDEAS / "seed_ideas.json", "nonexistent")
    msg = one_line(err)
    assert "nonexistent" in msg
    for name in ("median_mad_sae", "topk_warmup", "dead_latent_resampling"):
        assert name in msg


def test_a_list_without_a_chosen_name_asks_for_one() -> None:
    with pytest.raises(SpecError) as err:
        load_idea(IDEAS / "seed_ideas.json")
    msg = one_line(err)
    assert "3 ideas" in msg and "--idea" in msg and "topk_warmup" in msg


@pytest.mark.parametrize(
    ("file", "content", "expected"),
    [
        ("empty.json", "[]", "empty"),
        ("blank.yaml", "\n", "empty"),
        ("number.json", "42", "expected an idea"),
        ("strings.yaml", "- just text\n", "must be an object"),
        ("idea.txt", "title: t", "unsupported idea file type"),
        ("untitled.json", '{"experiment": "e"}', "'name' or a 'title'"),
        ("blank_exp.json", '{"title": "t", "experiment": "  "}', "'experiment' is empty"),
        ("list_exp.json", '{"title": "t", "experiment": ["a", "b"]}', "must be text"),
        ("runs_text.json", '{"title": "t", "experiment": "e", "max_runs": "many"}', "whole number"),
    ],
)
def test_bad_files_give_one_line(tmp_path: Path, file: str, content: str, expected: str) -> None:
    f = tmp_path / file
    f.write_text(content)
    with pytest.raises(SpecError) as err:
        load_ideas(f)
    msg = one_line(err)
    assert file in msg and expected in msg


def test_a_folder_is_not_an_idea_file(tmp_path: Path) -> None:
    folder = tmp_path / "ideas.json"
    folder.mkdir()
    with pytest.raises(SpecError) as err:
        load_idea(folder)
    assert "folder" in one_line(err)


def test_duplicate_names_are_ambiguous_only_when_chosen(tmp_path: Path) -> None:
    f = tmp_path / "ideas.json"
    f.write_text(
        json.dumps(
            [
                {"name": "a", "title": "A", "experiment": "1"},
                {"name": "a", "title": "A again", "experiment": "2"},
                {"name": "b", "title": "B", "experiment": "3"},
            ]
        )
    )
    assert load_idea(f, "b").experiment == "3"
    with pytest.raises(SpecError) as err:
        load_idea(f, "a")
    assert "2 ideas are named 'a'" in one_line(err)
