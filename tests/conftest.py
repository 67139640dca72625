"""Shared fixtures for the core-library tests (pool, regions, tracker, allocation, sampler, conditioning)."""

from __future__ import annotations

import os

# Before anything loads torch: OpenMP reads this once, at load. Spinning OpenMP threads make 2 torch threads
# ~7x slower than 1 on a busy 2-core machine; subprocesses the tests launch inherit it. A set value is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

# The suite never reaches the network: the default embedder resolves to the installed offline copy.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# As scripts/bootstrap.sh exports it: the tokenizers' own thread pools, in every process of two workers and their
# subprocesses, only compete for the 2 cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Five clearly separated topics, 20 subjects each, one topic-specific phrasing per topic.
TOPIC_SUBJECTS = {
    "animals": ["kitten", "puppy", "lion", "elephant", "giraffe", "zebra", "tiger", "rabbit", "horse", "fox",
                "wolf", "bear", "monkey", "deer", "squirrel", "hippo", "cheetah", "kangaroo", "panda", "camel"],
    "vehicles": ["sports car", "pickup truck", "motorcycle", "city bus", "freight train", "bicycle",
                 "jet airplane", "helicopter", "tractor", "scooter", "ambulance", "fire truck", "taxi cab",
                 "limousine", "school bus", "race car", "delivery van", "police car", "minivan", "jeep"],
    "food": ["pepperoni pizza", "ramen noodles", "cheeseburger", "chocolate cake", "sushi", "spaghetti",
             "pancakes", "tacos", "croissants", "salad", "fried chicken", "lasagna", "dumplings", "burrito",
             "steak", "waffles", "curry", "apple pie", "hot dog", "paella"],
    "space": ["spiral galaxy", "nebula", "astronaut", "rocket", "moon crater", "planet Saturn", "comet",
              "space station", "black hole", "supernova", "asteroid", "planet Mars", "satellite",
              "star cluster", "lunar lander", "solar flare", "Jupiter", "quasar", "meteor", "space shuttle"],
    "music": ["acoustic guitar", "grand piano", "violin", "drum kit", "saxophone", "trumpet", "cello",
              "electric bass guitar", "flute", "harp", "clarinet", "trombone", "accordion", "banjo", "ukulele",
              "oboe", "xylophone", "tuba", "mandolin", "harmonica"],
}
TOPIC_PHRASINGS = {
    "animals": "a wild {} animal in its natural habitat",
    "vehicles": "a {} vehicle driving on the road",
    "food": "a plate of delicious {} food served for dinner",
    "space": "a {} in outer space, astronomy photo of the cosmos",
    "music": "a {} musical instrument played at a concert",
}


def make_topic_prompts() -> tuple[list[str], list[str]]:
    """(prompts, topic of each prompt): 5 topics x 20 distinct prompts, grouped by topic."""
    prompts, topics = [], []
    for topic, subjects in TOPIC_SUBJECTS.items():
        for subject in subjects:
            prompts.append(TOPIC_PHRASINGS[topic].format(subject))
            topics.append(topic)
    return prompts, topics


@pytest.fixture(scope="session")
def minilm_embedder():
    """The default all-MiniLM-L6-v2 embedder, loaded once per session (also warms the library's cache)."""
    from diffusers_aria.regions import DEFAULT_EMBEDDER, load_embedder

    return load_embedder(DEFAULT_EMBEDDER)


@pytest.fixture(scope="session")
def topic_pool() -> tuple[list[str], list[str]]:
    return make_topic_prompts()


@pytest.fixture(scope="session")
def topic_regions(minilm_embedder, topic_pool):
    """K=5 regions of the topic pool, built once with the real embedder (by its id, as users do)."""
    from diffusers_aria.regions import DEFAULT_EMBEDDER, build_regions

    prompts, _ = topic_pool
    return build_regions(prompts, num_regions=5, embedder=DEFAULT_EMBEDDER, seed=0, method="sklearn", progress=False)


# ------------------------------------------------------------------ end-to-end fixtures (training script, CLI)
os.environ.setdefault("HF_HOME", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".hf_home"))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A tiny offline teacher pipeline (untrained: the scripts' plumbing does not need a good teacher)."""
    from diffusers_aria.embedded.builtin_pool import builtin_prompt_pool
    from diffusers_aria.embedded.tiny_teacher import make_tiny_teacher

    path = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    prompts = list(builtin_prompt_pool(num_prompts=64, seed=0)["prompt"])
    make_tiny_teacher(str(path), prompts=prompts, train_steps=0, progress=False)
    return str(path)


@pytest.fixture(scope="session")
def shared_regions(tmp_path_factory) -> str:
    """Regions of the 200-prompt built-in pool the end-to-end runs use (built once, loaded by every run)."""
    from diffusers_aria.regions import build_regions
    from diffusers_aria.training.inputs import load_pool

    pool, _ = load_pool("builtin", builtin_size=200, seed=0)
    path = tmp_path_factory.mktemp("regions") / "regions"
    build_regions(pool, num_regions=6, seed=0, progress=False).save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def debug_launch():
    """`debug_launch(fn, args, num_processes=2)`: `accelerate.debug_launcher` in a clean accelerate state."""
    return _debug_launch


def _debug_launch(fn, args=(), num_processes: int = 2) -> None:
    """`accelerate.debug_launcher` after clearing accelerate's process-wide state.

    The launcher forks: a state left by an in-process run earlier in the session (an `Accelerator` made by a
    test that calls a script's main()) would reach the children, and they would see one process.
    """
    from accelerate import debug_launcher
    from launching import reset_accelerate_state

    reset_accelerate_state()
    debug_launcher(fn, args=args, num_processes=num_processes)
