"""Approximate caching: the cache's policy, the graph rewrite, and the scheduler resuming a request
from a similar finished one's latent."""

from __future__ import annotations

import pytest
from lego.builtin_workflows import sd15_txt2img
from lego.graph import CACHED_LATENTS, Ref, instantiate, resume_from_cache
from lego.request_inputs import resolve_inputs
from lego.validation import validate_spec
from lego_coordinator.approx_cache import ApproxCache, allowed_skip, candidate_skips
from lego_coordinator.scheduler import Dispatch, RequestDone, Scheduler, Tensor
from lego_worker.prompt_signatures import embedding_signature, word_signature

from tests.unit.test_scheduler import costs, outputs_of

STEPS = 10
ITERATIONS = STEPS + 1  # PNDM's extra one: it spends its first timestep twice
REPEATS = 1


def graph(prompt: str = "p", steps: int = STEPS, approx: bool = True):  # type: ignore[no-untyped-def]
    spec = sd15_txt2img("wf", "tiny-sd15", default_size=128, approx_cache=approx)
    return instantiate(spec, resolve_inputs(spec, {"prompt": prompt, "steps": steps}))


def test_more_similar_prompts_skip_more_steps_at_most_half() -> None:
    assert candidate_skips(50, 51) == [5, 10, 15, 20, 25]
    assert [allowed_skip(s, 50) for s in (1.0, 0.95, 0.92, 0.86, 0.8, 0.76, 0.7)] == [
        25,
        25,
        20,
        15,
        10,
        5,
        0,
    ]
    assert candidate_skips(2, 3) == [1]  # never every iteration, never none
    # PNDM: its latent after its first iteration is a half step, and a resumed loop repeats one
    assert candidate_skips(STEPS, ITERATIONS, REPEATS) == [2, 3, 4, 5]
    assert candidate_skips(2, 3, REPEATS) == []


def test_a_lookup_takes_the_closest_entry_of_its_context_at_the_largest_skip_allowed() -> None:
    cache = ApproxCache(capacity_bytes=10_000)
    latents = {k: (f"a{k}", 100, "h0") for k in candidate_skips(50, 51)}
    cache.insert("ctx", [1.0, 0.0], "a", latents)
    cache.insert("ctx", [0.6, 0.8], "b", {k: (f"b{k}", 100, "h0") for k in (5, 10)})
    assert cache.lookup("other", [1.0, 0.0], 50) is None
    hit = cache.lookup("ctx", [0.9, 0.1], 50)  # cosine 0.994 with a: half the steps
    assert hit is not None and (hit.skip, hit.handle) == (25, "a25")
    hit = cache.lookup("ctx", [0.5, 0.85], 50)  # closest to b (0.99), which holds 10 at most
    assert hit is not None and (hit.skip, hit.handle) == (10, "b10")
    assert cache.lookup("ctx", [0.0, -1.0], 50) is None  # nothing close enough
    assert (cache.stats.lookups, cache.stats.hits, cache.stats.iterations_reused) == (4, 2, 35)
    assert sorted(map(str, cache.retained("b"))) == ["b10", "b5"]


def test_a_lookup_takes_the_entry_that_saves_most_not_only_the_most_similar() -> None:
    cache = ApproxCache(capacity_bytes=10_000)
    cache.insert("ctx", [1.0, 0.0], "near", {25: ("near25", 100, "h0")})  # needs 0.95
    cache.insert("ctx", [0.8, 0.6], "far", {15: ("far15", 100, "h0")})  # needs 0.85
    hit = cache.lookup("ctx", [0.95, 0.31], 50)  # near 0.951 allows 25; far 0.947 allows 20
    assert hit is not None and hit.handle == "near25"
    hit = cache.lookup("ctx", [0.92, 0.39], 50)  # near 0.921 allows 20 (it holds 25); far 0.971
    assert hit is not None and hit.handle == "far15"


def test_eviction_drops_the_least_beneficial_unpinned_item_and_frees_it() -> None:
    cache = ApproxCache(capacity_bytes=300)
    cache.insert("ctx", [1.0, 0.0], "a", {5: ("a5", 100, "h0"), 25: ("a25", 100, "h0")})
    cache.insert("ctx", [0.0, 1.0], "b", {10: ("b10", 100, "h0")})
    hit = cache.lookup("ctx", [0.0, 1.0], 50)  # b10 hit once: (1 + 1) x 10 = 20, pinned
    assert hit is not None and hit.handle == "b10"
    cache.insert("ctx", [0.7, 0.7], "c", {15: ("c15", 100, "h0")})  # a5 (1 x 5) goes
    assert cache.take_dead() == ["a5"] and cache.used_bytes == 300
    cache.insert("ctx", [0.6, 0.8], "d", {20: ("d20", 100, "h0")})  # c15 (15) < a25 (25); b10 pinned
    assert cache.take_dead() == ["c15"]
    cache.unpin(hit.item)
    cache.insert("ctx", [0.8, 0.6], "e", {25: ("e25", 100, "h0")})  # b10's 20 = d20's 20: the older
    assert cache.take_dead() == ["b10"]
    assert cache.stats.evicted == 3 and len(cache) == 3


def test_a_full_cache_never_evicts_the_entry_it_is_filling() -> None:
    cache = ApproxCache(capacity_bytes=150)
    cache.insert("ctx", [1.0, 0.0], "a", {5: ("a5", 100, "h0"), 10: ("a10", 100, "h0")})
    assert cache.retained("a") == ["a5"] and cache.take_dead() == []  # a10: the donor's Free frees it
    cache.insert("ctx", [0.0, 1.0], "b", {5: ("b5", 100, "h0"), 10: ("b10", 100, "h0")})
    assert cache.take_dead() == ["a5"] and cache.retained("b") == ["b5"]
    assert (len(cache), cache.used_bytes) == (1, 100)


def test_an_item_too_large_for_what_is_not_pinned_is_not_kept() -> None:
    cache = ApproxCache(capacity_bytes=100)
    cache.insert("ctx", [1.0], "a", {5: ("a5", 100, "h0")})
    assert cache.lookup("ctx", [1.0], 10) is not None  # pinned
    cache.insert("ctx", [1.0], "b", {5: ("b5", 100, "h0")})
    assert cache.retained("b") == [] and cache.take_dead() == []  # b's own Free frees it


def test_signatures_compare_prompts_by_meaning_or_by_shared_words() -> None:
    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    near = (
        word_signature("photograph of a red fox at dawn"),
        word_signature("photograph of a red fox at night"),
    )
    assert cosine(*near) == pytest.approx(6 / 7)
    assert cosine(near[0], word_signature("Photograph of a red fox, at dawn")) == pytest.approx(1.0)
    tokens = [[[1.0, 0.0], [0.0, 1.0]]]  # (batch, tokens, features): pooled over tokens
    assert embedding_signature(tokens) == pytest.approx([2**-0.5, 2**-0.5])


def test_an_approx_loop_holds_its_init_for_the_prompts_signature() -> None:
    request = graph()
    site = request.approx
    assert site is not None and len(site.iterations) == ITERATIONS
    encoder = request.nodes[site.encoder]
    assert encoder.signature_of == "embeddings" and encoder.inputs["text"] == "p"
    assert request.nodes[site.init].after == {site.encoder}
    assert graph(approx=False).approx is None
    assert all(node.signature_of == "" for node in graph(approx=False).nodes.values())


def test_resuming_drops_exactly_the_first_k_iterations_and_starts_from_the_cached_latent() -> None:
    request = graph()
    site = request.approx
    assert site is not None
    assert site.repeats == REPEATS
    resumed = resume_from_cache(request, 4)  # after 4 iterations: 3 gone, PNDM repeats one again
    per_iteration = len(site.iterations[0])  # two UNet branches and the scheduler's step
    assert len(request.nodes) - len(resumed.nodes) == 3 * per_iteration == 9
    init = resumed.nodes[site.init]
    assert init.mode == "init_from_latents" and init.after == frozenset()
    assert (init.inputs["first_index"], init.inputs["iterations"]) == (4, ITERATIONS - 3)
    assert init.inputs["cached_latents"] == CACHED_LATENTS and CACHED_LATENTS not in resumed.consumers
    first = [resumed.nodes[n] for n in site.iterations[3]]
    assert {first[0].inputs["sample"], first[-1].inputs["latents"]} == {
        Ref(site.init, "model_input"),
        Ref(site.init, "latents"),
    }
    steps = [n for n in resumed.nodes.values() if n.step]
    assert [n.inputs["step_index"] for n in steps] == list(range(ITERATIONS - 3))
    assert [(n.step, n.total_steps) for n in steps][-1] == (ITERATIONS - 3, ITERATIONS - 3)
    for start in (1, ITERATIONS - 1):  # a half step of PNDM's warm-up; nothing left to repeat
        with pytest.raises(ValueError, match=f"cannot resume after {start} of 11 iterations"):
            resume_from_cache(request, start)


def test_approx_caching_is_refused_with_a_controlnet_or_img2img() -> None:
    from lego.builtin_workflows import sd15_img2img

    spec = sd15_img2img("wf", "tiny-sd15")
    next(n for n in spec.nodes if n.op == "denoise_loop").attributes["approx_cache"] = "1"
    assert any(
        "approximate caching (approx_cache) is for text-to-image loops" in e for e in validate_spec(spec)
    )


def run(
    scheduler: Scheduler, request_id: str, prompt: str, signature: list[float]
) -> tuple[RequestDone, list[Dispatch]]:
    """Admit a request and complete its batches (instantly), its encoder reporting `signature`."""
    scheduler.admit(request_id, "wf", graph(prompt), 0.0)
    dispatched: list[Dispatch] = []
    events: list = []
    for _ in range(500):
        dispatches = scheduler.schedule(0.0).dispatches
        if not dispatches:
            break
        for dispatch in dispatches:
            dispatched.append(dispatch)
            signatures = {t.task_id: tuple(signature) for t in dispatch.tasks if t.node.signature_of}
            events += scheduler.complete(
                dispatch.batch_id, outputs_of(dispatch), 0.0, 0.01, signatures=signatures
            )
    [done] = [event for event in events if isinstance(event, RequestDone)]
    return done, dispatched


def test_a_similar_request_resumes_from_the_first_ones_latent_and_says_how_many_steps_it_skipped() -> None:
    scheduler = Scheduler(costs())
    scheduler.add_worker("w0", host="h0")
    first, _ = run(scheduler, "a", "a red fox", [1.0, 0.0])
    assert first.skipped_steps == 0 and first.nodes_executed == len(graph().nodes)
    kept = scheduler.retained_tensors("a")  # its latents after 1, 2, 3, 4 and 5 iterations
    assert sorted(map(str, kept)) == sorted(
        f"h:a/denoise_loop_2/step{k - 1}/scheduler/latents"
        for k in candidate_skips(STEPS, ITERATIONS, REPEATS)
    )
    second, dispatched = run(scheduler, "b", "a red fox", [0.99, 0.1])  # cosine 0.995: half
    assert second.skipped_steps == 4  # from the latent after 5 iterations; PNDM repeats one
    assert second.nodes_executed == first.nodes_executed - 4 * 3
    [init] = [
        t for d in dispatched for t in d.tasks if t.node.op == "noise_scheduler" and "init" in t.node.mode
    ]
    assert init.node.mode == "init_from_latents"
    assert init.inputs["cached_latents"] == "h:a/denoise_loop_2/step4/scheduler/latents"
    assert init.inputs["first_index"] == 5
    assert scheduler.retained_tensors("b") == []  # a hit does not fill the cache
    far, _ = run(scheduler, "c", "a steam train", [0.0, 1.0])
    assert far.skipped_steps == 0


def test_without_a_signature_a_request_runs_whole_and_leaves_nothing() -> None:
    scheduler = Scheduler(costs())
    scheduler.add_worker("w0", host="h0")
    done, _ = run(scheduler, "a", "p", [])
    assert done.skipped_steps == 0 and scheduler.retained_tensors("a") == []


def test_a_host_that_leaves_takes_its_latents_out_of_the_cache() -> None:
    scheduler = Scheduler(costs())
    scheduler.add_worker("w0", host="h0")
    run(scheduler, "a", "p", [1.0])
    kept = scheduler.retained_tensors("a")
    assert len(kept) == len(scheduler.approx) == 4
    scheduler.take_dead_tensors()
    scheduler.remove_worker("w0")
    assert len(scheduler.approx) == 0
    assert sorted(map(str, scheduler.take_dead_tensors())) == sorted(map(str, kept))  # freed there


def test_a_cached_latent_is_never_freed_by_the_request_that_reads_it() -> None:
    scheduler = Scheduler(costs())
    scheduler.add_worker("w0", host="h0")
    run(scheduler, "a", "p", [1.0])
    scheduler.take_dead_tensors()
    run(scheduler, "b", "p", [1.0])
    dead = {str(handle) for handle in scheduler.take_dead_tensors()}
    assert not dead & {str(handle) for handle in scheduler.retained_tensors("a")}
    assert isinstance(scheduler._requests["b"].produced[CACHED_LATENTS], Tensor)
