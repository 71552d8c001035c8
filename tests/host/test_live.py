"""Live streaming in a real ComfyUI: frames reach the queuing client while the prompt runs and are
VAEDecode's frames; the mp4 plays while it grows and survives an interrupt; steering through the
server's route switches prompts, replays bit for bit, and refuses bad requests with a 4xx."""
from __future__ import annotations

import io
import json
import time
import uuid

import pytest
import torch

from tools.comfy_server import Events, http
from tools.graphs import magi_graph, streaming_graph

UNET13, VAE = "tiny_skyreels_df_1.3b_layout.safetensors", "tiny_wan21_vae.safetensors"
ASYNC = dict(window_frames=17, overlap_frames=5, ar_step=1, causal_block_size=1)


def unique() -> str:
    return f"latents/{uuid.uuid4().hex[:8]}"


def add_live(g, sid, values=None, **live_inputs):
    """A Live View on the sampler; `values`: its prompts, as constant dummy conditionings."""
    if values is not None:
        conds = {f"prompt_{i + 1}": g.out(g.add("ARCacheEmptyConditioning", value=v)) for i, v in enumerate(values)}
        live_inputs["prompts"] = g.out(g.add("ARCachePromptSchedule", **conds))
    g.prompt[sid]["inputs"]["live"] = g.out(g.add("ARCacheLiveView", **dict(dict(view_size=4096), **live_inputs)))


def df_live(length=33, steps=3, values=None, save_video=False, **live_inputs):
    extra = {"save_video": True, "filename_prefix": f"ARCache/{uuid.uuid4().hex[:8]}"} if save_video else {}
    g, sid = streaming_graph(UNET13, length=length, seed=31, steps=steps, vae=VAE, schedule=ASYNC,
                             save_prefix=unique(), sampler_extra=extra)
    add_live(g, sid, values, **live_inputs)
    return g, sid


def decoded_to_file(g, sid) -> str:
    """VAEDecode of the sampler's LATENT, saved exactly by the testkit."""
    vae = g.prompt[sid]["inputs"]["vae"]
    name = f"{uuid.uuid4().hex[:8]}.pt"
    g.add("TestkitSaveTensor", images=g.out(g.add("VAEDecode", samples=g.out(sid), vae=vae)), filename=name)
    return name


def jpeg_of(frame: torch.Tensor) -> bytes:
    """What the live view sends for one frame: independent of the pack's code, PIL's JPEG of the
    uint8 frame at the pack's quality (same input, same bytes)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((frame.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def report_of(entry, sid) -> dict:
    return json.loads(entry["outputs"][sid]["text"][0])


def latent_of(comfy, entry, g):
    save_id = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
    return comfy.saved_latent(entry, save_id)


def frame_url(comfy, run, i, token) -> str:
    return f"{comfy.url}/arcache/live/{run}/{i}.jpg?token={token}"


@pytest.mark.parametrize("family", ["skyreels_df", "magi1"])
def test_live_frames_are_vaedecode_frames_and_arrive_while_running(comfy, family):
    if family == "skyreels_df":
        g, sid = df_live(length=33)
    else:
        g, sid = magi_graph(length=72, steps=4, vae="tiny_magi1_vae.safetensors", save_prefix=unique())
        add_live(g, sid)
    tensor = decoded_to_file(g, sid)
    with Events(comfy) as ev:
        entry = comfy.run(g.prompt)
        ends = ev.wait_for("arcache.live.end")
        kinds = [(m.get("type"), (m.get("data") or {}).get("node")) for m in ev.messages]
    start = ev.of("arcache.live.start")[0]
    assert start["node"] == sid and start["token"]
    frames_msgs = ev.of("arcache.live.frames")
    assert len(frames_msgs) >= 2                               # several pieces, announced one by one
    # the first frames were announced before the sampler finished
    assert kinds.index(("arcache.live.frames", sid)) < kinds.index(("executed", sid))
    assert ends[0]["status"] == "finished"
    video = torch.load(str(comfy.base_dir / "output" / tensor))
    total = sum(m["count"] for m in frames_msgs)
    assert total == video.shape[0] == ends[0]["frames"]
    for i in range(total):
        status, body = http(frame_url(comfy, start["run"], i, start["token"]))
        assert status == 200 and body == jpeg_of(video[i]), f"frame {i}"
    report = report_of(entry, sid)
    assert report["stream_decode"]["mode"] == "exact"
    assert sum(e[2] for e in report["emissions"]) == total
    assert report["ttff_s"] <= report["seconds"] and report["ttff_queue_s"] >= report["ttff_s"]
    assert report["startup_delay_s"] >= 0


def test_async_chunks_come_before_their_window_ends(comfy):
    g, sid = df_live(length=33)
    report = report_of(comfy.run(g.prompt), sid)
    first_window = report["calls_per_window"][0]
    assert report["ttff_calls"] < first_window                  # the first block, not the first window
    assert len(report["emissions"]) > report["windows"]


def test_file_plays_while_it_grows_and_has_every_frame(comfy):
    import av
    g, sid = df_live(length=401, steps=8, save_video=True)
    prefix = g.prompt[sid]["inputs"]["filename_prefix"]
    folder = comfy.base_dir / "output" / "ARCache"
    pid = comfy.queue(g.prompt)
    seen = 0
    t0 = time.time()
    while time.time() - t0 < 300 and not seen:
        for path in folder.glob(f"{prefix.split('/')[-1]}*.partial.mp4"):
            try:
                with av.open(str(path)) as c:
                    seen = sum(1 for _ in c.decode(video=0))
            except (av.error.InvalidDataError, av.error.FFmpegError, OSError):
                seen = 0
        running = comfy.get(f"/history/{pid}").get(pid) is None
        if seen:
            assert running, "the frames were only readable after the run"
        time.sleep(0.05)
    assert seen >= 1
    report = report_of(comfy.wait(pid), sid)
    with av.open(str(comfy.base_dir / "output" / report["video_file"])) as c:
        assert sum(1 for _ in c.decode(video=0)) == report["video_frames"] == 401


def test_interrupted_run_keeps_a_playable_partial_file(comfy):
    import av
    short, _ = df_live(length=33)
    before = latent_of(comfy, comfy.run(short.prompt), short)
    g, sid = df_live(length=801, steps=10, save_video=True)
    name = g.prompt[sid]["inputs"]["filename_prefix"].split("/")[-1]
    with Events(comfy) as ev:
        pid = comfy.queue(g.prompt)
        ev.wait_for("arcache.live.frames", count=2)
        comfy.interrupt()
        end = ev.wait_for("arcache.live.end")[0]
    assert end["status"] == "interrupted"
    with pytest.raises(Exception):
        comfy.wait(pid)
    kept = list((comfy.base_dir / "output" / "ARCache").glob(f"{name}*_interrupted.mp4"))
    assert len(kept) == 1 and not list((comfy.base_dir / "output" / "ARCache").glob(f"{name}*.partial.mp4"))
    with av.open(str(kept[0])) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert 1 <= frames < 801
    short, _ = df_live(length=33)                               # the next live run is a clean one
    assert torch.equal(latent_of(comfy, comfy.run(short.prompt), short), before)


def steer(comfy, body, raw: bytes | None = None, route: str = "/arcache/steer"):
    data = raw if raw is not None else json.dumps(body).encode()
    return http(comfy.url + route, "POST", data, {"Content-Type": "application/json"})


def queue_live(comfy, ev, prompt) -> tuple[str, dict]:
    """Queue a live prompt; (its id, its start event) once its first frames are out."""
    pid = comfy.queue(prompt)
    start = ev.wait_for("arcache.live.start")[0]
    ev.wait_for("arcache.live.frames")
    return pid, start


@pytest.mark.parametrize("family", ["skyreels_df", "magi1"])
def test_steered_run_equals_its_replay(comfy, family):
    def graph(**live):
        if family == "skyreels_df":
            return df_live(length=161, steps=4, values=[0.0, 2.0], **live)
        g, sid = magi_graph(length=24 * 12, steps=4, vae="tiny_magi1_vae.safetensors", save_prefix=unique())
        texts = {f"prompt_{i + 1}": g.out(g.add("ARCacheMagiTextEncode", clip=g.out(g.add("TestkitTinyT5Loader", seed=0)),
                                                text=t, special_tokens="special_tokens.npz"))
                 for i, t in enumerate(["a red ball rolls", "a blue cube spins fast"])}
        g.prompt[sid]["inputs"]["live"] = g.out(g.add("ARCacheLiveView", prompts=g.out(g.add("ARCachePromptSchedule", **texts)),
                                                      **live))
        return g, sid

    g, sid = graph()
    with Events(comfy) as ev:
        pid, start = queue_live(comfy, ev, g.prompt)
        status, body = steer(comfy, {"run": start["run"], "token": start["token"], "slot": 1})
        assert status == 200, body
        entry = comfy.wait(pid)
    steered, report = latent_of(comfy, entry, g), report_of(entry, sid)
    assert len(report["switches"]) == 1 and report["switches"][0]["slot"] == 1
    assert ev.of("arcache.live.switch")[0]["call"] == report["switches"][0]["call"]

    g2, sid2 = graph(replay=json.dumps(report["switches"]))
    entry2 = comfy.run(g2.prompt)
    assert torch.equal(latent_of(comfy, entry2, g2), steered)
    assert report_of(entry2, sid2)["switches"] == [dict(s, t_s=report_of(entry2, sid2)["switches"][0]["t_s"])
                                                   for s in report["switches"]]
    g3, _ = graph()
    unsteered = latent_of(comfy, comfy.run(g3.prompt), g3)
    assert not torch.equal(unsteered, steered)


def test_steer_route_refuses_bad_requests_and_changes_nothing(comfy):
    g, sid = df_live(length=161, steps=4, values=[0.0, 2.0])
    with Events(comfy) as ev:
        pid, start = queue_live(comfy, ev, g.prompt)
        run, token = start["run"], start["token"]
        cases = [
            ({"run": run, "slot": 1}, None, 403),                          # no token
            ({"run": run, "token": "x" * 22, "slot": 1}, None, 403),       # wrong token
            ({"run": uuid.uuid4().hex, "token": token, "slot": 1}, None, 404),   # another (unknown) run
            ({"run": run, "token": token, "slot": 2}, None, 400),          # out of range
            ({"run": run, "token": token, "slot": -1}, None, 400),
            ({"run": run, "token": token, "slot": True}, None, 400),
            ({"run": run, "token": token, "slot": "1"}, None, 400),
            (None, b"{not json", 400),
            (None, b"[1, 2]", 400),
            (None, b'{"pad": "' + b"x" * 20000 + b'"}', 413),
            (None, b"[" * 16000, 400),                                     # nested too deep for the parser
        ]
        for body, raw, want in cases:
            status, answer = steer(comfy, body, raw)
            assert status == want, (body if raw is None else raw[:40], status, answer)
            assert "error" in json.loads(answer)
        assert http(frame_url(comfy, run, 0, "wrong"))[0] == 403
        assert http(frame_url(comfy, run, 10 ** 6, token))[0] == 404
        assert http(f"{comfy.url}/arcache/live/{run}/abc.jpg?token={token}")[0] == 400
        assert http(frame_url(comfy, uuid.uuid4().hex, 0, token))[0] == 404
        entry = comfy.wait(pid)
    assert report_of(entry, sid)["switches"] == []
    assert steer(comfy, {"run": run, "token": token, "slot": 1})[0] == 409       # the run has ended
    g2, _ = df_live(length=161, steps=4, values=[0.0, 2.0])
    assert torch.equal(latent_of(comfy, comfy.run(g2.prompt), g2), latent_of(comfy, entry, g))


def test_replay_that_does_not_fit_the_run_is_a_named_error(comfy):
    from tools.comfy_server import ComfyError
    g, _ = df_live(length=33, values=[0.0, 2.0], replay=json.dumps([{"call": 10 ** 6, "piece": 0, "slot": 1}]))
    with pytest.raises(ComfyError, match="replay: switches at call"):
        comfy.run(g.prompt)
    g, _ = df_live(length=33, values=[0.0, 2.0], replay=json.dumps([{"call": 3, "piece": 0, "slot": 5}]))
    with pytest.raises(ComfyError, match="replay: switches to prompt slot 5"):
        comfy.run(g.prompt)
    g, _ = df_live(length=33, replay="not json")
    with pytest.raises(ComfyError, match="Live View, replay: is not JSON"):
        comfy.run(g.prompt)
    g, _ = df_live(length=33, replay=json.dumps([{"call": 3, "slot": 1}]))       # no piece: not a logged switch
    with pytest.raises(ComfyError, match="replay: entry .* is not a switch"):
        comfy.run(g.prompt)


def test_without_a_vae_the_player_gets_latent_preview_frames(comfy):
    from tools.comfy_server import ComfyError
    g, sid = streaming_graph(UNET13, length=33, seed=31, steps=3, schedule=ASYNC, save_prefix=unique())
    add_live(g, sid)
    with Events(comfy) as ev:
        report = report_of(comfy.run(g.prompt), sid)
        ev.wait_for("arcache.live.end")
    assert report["stream_decode"] == {"mode": "latent_preview"}
    assert sum(m["count"] for m in ev.of("arcache.live.frames")) == 33          # one per video frame
    assert report["drift"] is None                            # preview colours are not the video: not measured
    g, sid = magi_graph(length=24, steps=4, save_prefix=unique())
    add_live(g, sid)
    with pytest.raises(ComfyError, match="live: shows decoded frames, and MAGI-1 latents have no preview"):
        comfy.run(g.prompt)


@pytest.mark.parametrize("family", ["skyreels_df", "magi1"])
def test_extension_streams_only_the_new_frames(comfy, family):
    """Continuing a video whose latents do not fill the MAGI-1 VAE's 3-frame tiles (17 frames -> 5
    latents): the decoder holds part of the user's video back, and those frames must not reach the
    player; what does is VAEDecode of the output after the given video."""
    from tools.media import write_test_video
    write_test_video(comfy.base_dir / "input" / "live_prefix17.mp4", frames=17)
    if family == "skyreels_df":
        g, sid = streaming_graph(UNET13, length=21, seed=31, steps=3, vae=VAE, schedule=ASYNC, save_prefix=unique())
    else:
        g, sid = magi_graph(length=48, steps=4, vae="tiny_magi1_vae.safetensors", save_prefix=unique())
    vae = g.prompt[sid]["inputs"]["vae"]
    frames = g.add("GetVideoComponents", video=g.out(g.add("LoadVideo", file="live_prefix17.mp4")))
    g.prompt[sid]["inputs"]["prefix_latent"] = g.out(g.add("VAEEncode", pixels=g.out(frames), vae=vae))
    add_live(g, sid)
    tensor = decoded_to_file(g, sid)
    with Events(comfy) as ev:
        entry = comfy.run(g.prompt)
        ev.wait_for("arcache.live.end")
    video = torch.load(str(comfy.base_dir / "output" / tensor))
    start = ev.of("arcache.live.start")[0]
    given = 17 if family == "skyreels_df" else 20            # the given video's frames in VAEDecode's output
    total = sum(m["count"] for m in ev.of("arcache.live.frames"))
    assert total == video.shape[0] - given > 0
    for i in range(total):
        status, body = http(frame_url(comfy, start["run"], i, start["token"]))
        assert status == 200 and body == jpeg_of(video[given + i]), f"frame {i}"
    assert sum(e[2] for e in report_of(entry, sid)["emissions"]) == total


def test_a_steered_prompt_re_anchors_the_drift_anchor(comfy):
    """The Drift Anchor leaves the first window of every prompt as generated and pulls the later ones
    to it: a prompt switched in the Live View is a new prompt too, so with the anchor at full strength
    and a switch at window 1, windows 0 and 1 equal the unanchored run's and window 2 does not."""
    def run(anchor: bool):
        g, sid = streaming_graph(UNET13, length=41, seed=33, steps=3, schedule=dict(window_frames=17, overlap_frames=5,
                                 prefix_mode="latent"), save_prefix=unique())
        add_live(g, sid, values=[0.0, 2.0], replay=json.dumps([{"call": 3, "piece": 1, "slot": 1}]))
        if anchor:
            g.prompt[sid]["inputs"]["anchor"] = g.out(g.add("ARCacheDriftAnchor", strength=1.0))
        entry = comfy.run(g.prompt)
        assert len(report_of(entry, sid)["switches"]) == 1
        return latent_of(comfy, entry, g)
    plain, anchored = run(False), run(True)
    assert torch.equal(plain[:, :, :8], anchored[:, :, :8])           # windows 0 (5 frames) and 1 (3 frames)
    assert not torch.allclose(plain[:, :, 8:], anchored[:, :, 8:])


@pytest.mark.parametrize("with_vae", [True, False])
def test_magi_preview_is_a_decoded_frame_per_chunk(comfy, with_vae):
    """MAGI-1 has no latent-to-RGB factors: with a VAE the node preview is a decoded frame that
    changes once per chunk (here without a file or a Live View: a decode of the chunk's last latent
    frame), without one the sampler shows progress only."""
    g, sid = magi_graph(length=72, steps=4, vae="tiny_magi1_vae.safetensors" if with_vae else None,
                        save_prefix=unique())
    with Events(comfy) as ev:
        comfy.run(g.prompt)
        time.sleep(0.5)                   # the last messages are sent after the prompt's history
    previews = ev.binary.count(1)
    if with_vae:
        assert previews >= 3 - 1          # every step after the first chunk finished carries one
    else:
        assert previews == 0
    assert ev.of("progress")


def test_a_replaying_run_takes_no_live_switch(comfy):
    g, sid = df_live(length=161, steps=4, values=[0.0, 2.0], replay="[]")
    with Events(comfy) as ev:
        pid = comfy.queue(g.prompt)
        start = ev.wait_for("arcache.live.start")[0]
        assert start["steerable"] is False
        status, body = steer(comfy, {"run": start["run"], "token": start["token"], "slot": 1})
        entry = comfy.wait(pid)
    assert status == 409 and "replays" in json.loads(body)["error"]
    assert report_of(entry, sid)["switches"] == []


@pytest.mark.parametrize("family", ["skyreels_df", "magi1"])
def test_finish_keeps_the_video_so_far(comfy, family):
    """POST /arcache/finish mid-run: the sampler returns normally with the video up to the next
    finished window/chunk, which is the start of the full run's video bit for bit (later pieces
    never change earlier ones), and the file holds exactly its frames."""
    import av

    def graph():
        if family == "skyreels_df":
            return df_live(length=401, steps=6, save_video=True)
        g, sid = magi_graph(length=24 * 20, steps=4, vae="tiny_magi1_vae.safetensors", save_prefix=unique(),
                            sampler_extra={"save_video": True, "filename_prefix": f"ARCache/{uuid.uuid4().hex[:8]}"})
        add_live(g, sid)
        return g, sid

    g, sid = graph()
    with Events(comfy) as ev:
        pid, start = queue_live(comfy, ev, g.prompt)
        assert steer(comfy, {"run": start["run"], "token": "wrong"}, route="/arcache/finish")[0] == 403
        status, body = steer(comfy, {"run": start["run"], "token": start["token"]}, route="/arcache/finish")
        assert status == 200, body
        entry = comfy.wait(pid)
    early, report = latent_of(comfy, entry, g), report_of(entry, sid)
    assert "finished_early" in report and ev.of("arcache.live.end")[0]["status"] == "finished"
    g2, _ = graph()
    g2.prompt[next(k for k, v in g2.prompt.items() if v["class_type"] == "ARCacheLiveView")]["inputs"]["replay"] = "[]"
    full = latent_of(comfy, comfy.run(g2.prompt), g2)
    assert 0 < early.shape[2] < full.shape[2]
    assert torch.equal(early, full[:, :, :early.shape[2]])
    with av.open(str(comfy.base_dir / "output" / report["video_file"])) as c:
        assert sum(1 for _ in c.decode(video=0)) == report["video_frames"] == sum(e[2] for e in report["emissions"])
