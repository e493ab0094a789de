"""Text environments: scripted walkthroughs win, splits are disjoint, crashed workers restart."""

import os
import shutil

import pytest

from jaxlab.envs import EnvCrashed, EnvError, EnvWorker, TinyRoomsEnv, make_env


def test_tiny_walkthrough_wins_and_splits_are_disjoint():
    env = TinyRoomsEnv(num_rooms=6, step_limit=20)
    splits = {s: set(env.variations("coin", s)) for s in ("train", "dev", "test")}
    assert splits["train"] and splits["dev"] and splits["test"]
    assert not (splits["train"] & splits["test"]) and not (splits["dev"] & splits["test"])
    for variation in (0, 3, 4, 17):
        first = env.reset("coin", variation)
        assert "coin" not in first.observation or "take coin" in env.valid_actions()
        plan = env.walkthrough()
        for i, action in enumerate(plan):
            assert action in env.valid_actions()
            out = env.step(action)
            assert out.done == (i == len(plan) - 1)
        assert out.reward == 1.0 and out.info["won"] and out.info["score"] == 1.0


def test_tiny_step_limit_truncates_without_reward():
    env = TinyRoomsEnv(num_rooms=4, step_limit=3)
    env.reset("coin", 0)
    outs = [env.step("look") for _ in range(3)]
    assert [o.done for o in outs] == [False, False, True]
    assert outs[-1].info["truncated"] and sum(o.reward for o in outs) == 0.0
    with pytest.raises(RuntimeError):
        env.step("look")
    with pytest.raises(EnvError, match="not one of"):
        env.reset("boil", 0)


def test_worker_restarts_a_killed_process_and_marks_the_call():
    with EnvWorker("tiny", {"num_rooms": 4}) as worker:
        first = worker.reset("coin", 2)
        assert worker.step("look").observation == first.observation
        pid = worker.pid
        os.kill(pid, 9)
        with pytest.raises(EnvCrashed, match="restarted"):
            worker.step("look")
        assert worker.restarts == 1 and worker.pid != pid
        # the new process plays a whole episode again
        assert worker.reset("coin", 2).observation == first.observation
        with pytest.raises(EnvError, match="not one of"):
            worker.reset("nope", 0)


java = pytest.mark.skipif(shutil.which("java") is None, reason="ScienceWorld needs Java 17")


@java
def test_scienceworld_gold_path_reaches_100():
    env = make_env("scienceworld", simplifications="easy", step_limit=100)
    try:
        assert len(env.tasks()) == 30
        train, test = env.variations("boil", "train"), env.variations("boil", "test")
        assert train and test and not set(train) & set(test)
        first = env.reset("boil", train[0], gold_path=True)
        assert "boil" in first.goal
        total = 0.0
        for action in env.gold_actions():
            out = env.step(action)
            total += out.reward
            if out.done:
                break
        assert out.info["won"] and out.info["score"] == pytest.approx(1.0)
        assert total == pytest.approx(1.0)  # rewards are the score's increments
        assert "look around" in env.valid_actions()
    finally:
        env.close()


@java
def test_scienceworld_action_menu_and_lifespan_scores():
    """The menu of configs/rl/*_scienceworld.yaml: only the valid actions with the given verbs; the
    lifespan scores the configs describe (0.5 outside, -1 and the end for a wrong focus)."""
    with pytest.raises(EnvError, match="action_verbs"):
        make_env("scienceworld", action_verbs="focus on")
    env = make_env("scienceworld", step_limit=3, action_verbs=["teleport to", "focus on"])
    try:
        task = "lifespan-longest-lived"
        env.reset(task, env.variations(task, "train")[0])
        menu = env.valid_actions()
        assert menu and all(a.startswith(("teleport to ", "focus on ")) for a in menu)
        assert "teleport to outside" in menu and "look around" not in menu
        out = env.step("teleport to outside")
        assert out.info["score"] == pytest.approx(0.5) and not out.done
        animals = [a for a in env.valid_actions() if a.startswith("focus on baby")]
        assert len(animals) >= 2  # the animals to choose between are on the menu
        out = env.step("focus on air")
        assert out.done and not out.info["won"] and out.info["score"] == pytest.approx(-1.0)
    finally:
        env.close()


def test_textworld_coin_collector_walkthrough_wins(tmp_path):
    env = make_env("textworld", tasks=("coin-3",), cache_dir=str(tmp_path), goal="short")
    try:
        first = env.reset("coin-3", 0)
        assert first.goal == "Find the coin and take it." and first.observation
        plan = env.walkthrough()
        assert len(plan) >= 2 and plan[-1] == "take coin"
        for action in plan:
            assert action in env.valid_actions()
            out = env.step(action)
        assert out.done and out.info["won"] and out.reward == 1.0
        assert (tmp_path / "coin-3-seed0.z8").is_file()  # cached for the next run
    finally:
        env.close()
