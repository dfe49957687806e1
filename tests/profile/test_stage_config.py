"""``ProfileStageConfig`` sections as users write them."""

from __future__ import annotations

from userip.profile.stage import ProfileStageConfig


def test_an_lm_section_with_only_placement_keeps_the_default_lm():
    # `lm: {device: cuda}` used to fail at run time with "--lm ... got ''" (found on the first GPU run).
    config = ProfileStageConfig.from_dict({"lm": {"device": "cpu", "table_device": "cpu"}})
    assert config.lm.name_or_path == ProfileStageConfig().lm.name_or_path == "offline"
    assert config.lm.device == "cpu"
    assert ProfileStageConfig.from_dict({"lm": {"name_or_path": "random"}}).lm.name_or_path == "random"
