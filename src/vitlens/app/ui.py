"""The page: a Gradio ``Blocks`` app over :class:`~vitlens.app.core.Explorer` (and a
:class:`~vitlens.app.bench_view.BenchView`).

Views: **Explain** (upload or sample, top-5 as targets, class box with completion, prompt box for CLIP-style
models, methods with controls generated from their declared parameters, overlays side by side with an
opacity control and run times, progress, PNG and ``.npy`` downloads), **Faithfulness** (insertion and
deletion curves of a chosen map, substrate and steps selectable, AUCs, the images at a chosen step) and,
with ``--bench DIR``, **Bench** (the results table, per-image rows filterable by class and method and
sortable by a metric, every method's map of an image with its values).

Every handler is wrapped by :func:`~vitlens.app.core.guard`: a bad input becomes a one-line message in the
page (the ``#status`` line and a toast) and the server goes on. Handlers that run the model share one
queue slot (``concurrency_id="model"``).
"""
from __future__ import annotations

import html
import itertools
import json
import os
from typing import Optional

from .core import Explorer, curves_figure, guard, heat_rgb, overlay_rgb, to_uint8, write_downloads
from .params import Control, controls_for, parse_values

DEFAULT_METHODS = ("legrad",)
CSS = """
#status p { margin: 0; }
#status .vl-error { color: #b00020; font-weight: 600; }
#status .vl-ok { color: #1b5e20; }
.vl-params { border-left: 3px solid #8ab4f8; padding-left: 6px; }
footer { display: none !important; }
#maps .grid-wrap, #bench-maps .grid-wrap { min-height: 0 !important; max-height: none !important; }
"""


def import_gradio():
    """Gradio, offline: no analytics, no version check (``pip install "vitlens[app]"`` provides it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        from ..errors import VitlensError

        raise VitlensError('the app needs Gradio: pip install "vitlens[app]" (or pip install "gradio>=6,<7").') \
            from None
    return gr


_SEQ = itertools.count(1)


def _ok(msg: str) -> str:
    """A status line; ``data-seq`` numbers every message, so that a repeated message is still a new one."""
    return f'<p class="vl-ok" data-seq="{next(_SEQ)}">{html.escape(msg)}</p>'


def _err(msg: str) -> str:
    return f'<p class="vl-error" data-seq="{next(_SEQ)}">⚠ {html.escape(msg)}</p>'


def _component(gr, c: Control):
    label = c.name
    info = f"{c.help}; default {c.default!r}"
    eid = f"p-{c.method}-{c.name}"
    if c.kind == "choice":
        return gr.Dropdown(list(c.choices), value=c.value, label=label, info=info, elem_id=eid, filterable=False)
    if c.kind == "bool":
        return gr.Checkbox(value=c.value, label=label, info=info, elem_id=eid)
    if c.kind == "int":
        return gr.Number(value=c.value, precision=0, label=label, info=info, elem_id=eid)
    if c.kind == "float":
        return gr.Number(value=c.value, label=label, info=info, elem_id=eid)
    return gr.Textbox(value=c.value, label=label, info=info + ("; empty = None" if c.optional else ""),
                      placeholder="None" if c.optional else "", elem_id=eid, max_lines=1)


def build_app(explorer: Explorer, bench=None, *, default_methods=DEFAULT_METHODS, title: Optional[str] = None):
    """The Gradio ``Blocks`` of the app (not launched)."""
    gr = import_gradio()
    import pandas as pd

    from ..data.samples import SAMPLE_NAMES
    from ..methods import get_method
    from ..metrics import get_metric
    from ..metrics.causal import SUBSTRATES

    ok, not_ok = explorer.available_methods()
    infos = {m: get_method(m) for m in ok}
    controls = {m: controls_for(infos[m]) for m in ok}
    flat: list[tuple[str, Control]] = [(m, c) for m in ok for c in controls[m]]
    default_methods = [m for m in default_methods if m in ok] or ok[:1]
    names = explorer.class_names
    del_defaults = get_metric("deletion").defaults
    sub_default = del_defaults.get("substrate") or "blur"
    steps_default = int(del_defaults.get("n_steps", 224))

    # delete_cache: Gradio's copies of the images and downloads, hourly when older than a day, and at exit
    with gr.Blocks(title=title or "vitlens", fill_width=True, delete_cache=(3600, 86400)) as demo:
        state = gr.State({"image": None, "results": [], "curves": None})
        gr.Markdown(f"### vitlens · {explorer.adapter.describe()}")
        status = gr.HTML("", elem_id="status")

        def failing(n: int):
            """on_error for a handler with ``n`` outputs, the first being the status line."""

            def on_error(msg: str):
                gr.Warning(msg)
                return (_err(msg),) + tuple(gr.skip() for _ in range(n - 1))

            return on_error

        with gr.Tabs(elem_id="tabs"):
            # ---------------------------------------------------------------------------- Explain
            with gr.Tab("Explain", id="explain", elem_id="tab-explain"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        upload = gr.File(label="Upload an image", type="filepath", elem_id="upload",
                                         file_count="single")
                        sample = gr.Radio(list(SAMPLE_NAMES), value=None, label="…or a built-in sample",
                                          elem_id="samples")
                        view = gr.Image(label="Model input (after the model's eval transform)", interactive=False,
                                        elem_id="input-view", height=260, format="png")
                        top5 = gr.Radio([], label="Top-5 predictions (click one to explain it)", elem_id="top5",
                                        visible=bool(names))
                        klass = gr.Dropdown([f"{i}: {n}" for i, n in enumerate(names or [])], value=None,
                                            allow_custom_value=True, filterable=True, visible=bool(names),
                                            label="Class to explain (type to complete; empty: the predicted class)",
                                            elem_id="class-box")
                        prompt = gr.Textbox(label="Text prompt (CLIP/SigLIP; wins over the class)",
                                            visible=explorer.supports_text, elem_id="prompt", max_lines=1)
                    with gr.Column(scale=2, min_width=480):
                        methods = gr.CheckboxGroup(ok, value=default_methods, label="Methods", elem_id="methods")
                        if not_ok:
                            gr.Markdown("Not available for this model: " + "; ".join(
                                f"`{m}` ({why})" for m, why in sorted(not_ok.items())), elem_id="not-available")
                        groups, comps = {}, []
                        for m in ok:
                            with gr.Accordion(f"{m} — {infos[m].description}", open=True,
                                              visible=m in default_methods, elem_id=f"params-{m}",
                                              elem_classes="vl-params") as g:
                                if not controls[m]:
                                    gr.Markdown("(no parameters)")
                                with gr.Row():
                                    for c in controls[m]:
                                        comps.append(_component(gr, c))
                            groups[m] = g
                        with gr.Row():
                            seed = gr.Number(0, precision=0, label="seed", elem_id="seed", min_width=100)
                            opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="overlay opacity",
                                                elem_id="opacity")
                        run = gr.Button("Explain", variant="primary", elem_id="run")
                        gallery = gr.Gallery(label="Maps (method · run time)", columns=4, elem_id="maps",
                                             format="png", object_fit="contain", allow_preview=True, preview=False,
                                             fit_columns=False)
                        timings = gr.Markdown(elem_id="timings")
                        files = gr.File(label="Downloads: overlay PNG and map .npy per method", file_count="multiple",
                                        interactive=False, elem_id="downloads")

            # ---------------------------------------------------------------------------- Faithfulness
            with gr.Tab("Faithfulness", id="faithfulness", elem_id="tab-faithfulness"):
                gr.Markdown("Insertion and deletion (RISE; `vitlens.metrics.insertion` / `deletion`, protocol "
                            "`paper`) of one map of the current image: pixels are inserted into / deleted from "
                            "the substrate most salient first; the curve is the target's score after each step.")
                with gr.Row():
                    faith_map = gr.Dropdown([], label="Map", elem_id="faith-map", scale=3)
                    substrate = gr.Dropdown(list(SUBSTRATES), value=sub_default, label="substrate",
                                            elem_id="substrate", filterable=False)
                    steps = gr.Number(steps_default, precision=0, label="steps", elem_id="steps")
                plot = gr.Button("Plot insertion and deletion", variant="primary", elem_id="plot")
                auc = gr.Markdown(elem_id="auc")
                with gr.Row():
                    curve_img = gr.Image(label="Curves", interactive=False, elem_id="curves", format="png")
                    with gr.Column():
                        step = gr.Slider(0, steps_default, value=0, step=1, label="step", elem_id="step")
                        with gr.Row():
                            del_img = gr.Image(label="deletion at this step", interactive=False, elem_id="del-img",
                                               format="png")
                            ins_img = gr.Image(label="insertion at this step", interactive=False, elem_id="ins-img",
                                               format="png")
                curves_file = gr.File(label="Curves and exact AUCs (JSON)", interactive=False, elem_id="curves-file")

            # ---------------------------------------------------------------------------- Bench
            if bench is not None:
                with gr.Tab("Bench", id="bench", elem_id="tab-bench"):
                    gr.Markdown(f"Bench folder `{bench.folder}` (read-only). {bench.notes()}", elem_id="bench-notes")
                    head, rows_ = bench.summary()
                    gr.Dataframe(pd.DataFrame(rows_, columns=head), label="Results (mean [95 % interval] (n))",
                                 interactive=False, elem_id="bench-summary", wrap=True)
                    with gr.Row():
                        b_cls = gr.Dropdown(["all"] + bench.classes(), value="all", label="class",
                                            elem_id="bench-class")
                        b_method = gr.Dropdown(["all"] + bench.methods, value="all", label="method",
                                               elem_id="bench-method")
                        b_search = gr.Textbox(label="image id contains", elem_id="bench-search", max_lines=1)
                        b_sort = gr.Dropdown(["(image id)"] + bench.metrics, value="(image id)", label="sort by",
                                             elem_id="bench-sort")
                        b_order = gr.Radio(["ascending", "descending"], value="ascending", label="order",
                                           elem_id="bench-order")
                    b_count = gr.Markdown(elem_id="bench-count")
                    h0, r0, n0 = bench.rows()
                    b_rows = gr.Dataframe(pd.DataFrame(r0, columns=h0), interactive=False, elem_id="bench-rows",
                                          label="Per image and method (click a row to see the image's maps)")
                    with gr.Row():
                        b_image = gr.Dropdown(bench.image_ids(), value=None, allow_custom_value=True,
                                              label="image", elem_id="bench-image", scale=3)
                        b_show = gr.Button("Show every method's map", elem_id="bench-show")
                    b_note = gr.Markdown(elem_id="bench-note")
                    b_maps = gr.Gallery(label="Maps of the image (method: metric values)", columns=4,
                                        elem_id="bench-maps", format="png", fit_columns=False)

        # ------------------------------------------------------------------------------------ handlers
        def new_image(entry):
            choices = [(f"{label.split(',')[0]} — {p * 100:.1f} %", f"{i}: {label}") for i, label, p in entry.top5]
            first = choices[0][1] if choices else None
            new_state = {"image": entry.key, "results": [], "curves": None}
            size = f"{entry.size[0]} x {entry.size[1]}"
            msg = f"Loaded {entry.name} ({size})" + (f"; predicted {entry.top5[0][1].split(',')[0]} "
                                                   f"(p = {entry.top5[0][2]:.3f})." if entry.top5 else ".")
            return (_ok(msg), to_uint8(entry.pixels), gr.update(choices=choices, value=first), first, new_state, [],
                    None, "", gr.update(choices=[], value=None))

        img_outputs = [status, view, top5, klass, state, gallery, files, timings, faith_map]

        def on_upload(path):
            if not path:
                return tuple(gr.skip() for _ in img_outputs)
            return new_image(explorer.open_upload(path))

        def on_sample(name):
            if not name:
                return tuple(gr.skip() for _ in img_outputs)
            return new_image(explorer.open_sample(name))

        upload.upload(guard(on_upload, failing(len(img_outputs))), [upload], img_outputs,
                      concurrency_id="model", api_visibility="private").then(
            lambda: None, None, [upload], api_visibility="private")  # the box is ready for the next file
        sample.change(guard(on_sample, failing(len(img_outputs))), [sample], img_outputs,
                      concurrency_id="model", api_visibility="private")
        top5.select(lambda v: v, [top5], [klass], api_visibility="private")

        def on_methods(chosen):
            return [gr.update(visible=m in (chosen or [])) for m in ok]

        methods.change(on_methods, [methods], [groups[m] for m in ok], api_visibility="private")

        def gallery_items(keys, alpha):
            items, paths = [], []
            for k in keys:
                r = explorer.result(k)
                e = explorer.image(r.image_key)
                items.append((overlay_rgb(e.pixels, r.map, alpha), f"{r.method} · {r.seconds:.2f} s"))
                paths += write_downloads(explorer, r, alpha)
            return items, paths

        def on_run(st, chosen, klass_v, prompt_v, seed_v, alpha,
                   progress=gr.Progress(track_tqdm=True), *values):  # noqa: B008 - how Gradio passes its tracker
            # (``progress`` positional, before ``*values``: Gradio injects its tracker only into positional parameters)
            entry = explorer.image((st or {}).get("image"))
            chosen = [m for m in ok if m in (chosen or [])]
            if not chosen:
                raise_input("choose at least one method.")
            if seed_v is None:
                raise_input("seed is empty: give an integer (e.g. 0).")
            seed_i = int(seed_v)
            target, idx, label = explorer.resolve_target(entry, klass_v, prompt_v)
            by_method = {m: [] for m in ok}
            for (m, _), v in zip(flat, values):
                by_method[m].append(v)
            params = {m: parse_values(infos[m], controls[m], by_method[m]) for m in chosen}  # all checked first
            keys, errors, lines = [], [], []
            for i, m in enumerate(chosen):
                progress((i, len(chosen)), desc=f"{m} ({i + 1}/{len(chosen)})")
                try:
                    res, cached = explorer.explain(entry, m, params[m], target, seed_i, progress=True)
                except Exception as e:  # noqa: BLE001 - one method failing leaves the others' maps
                    from ..errors import VitlensError

                    text = " ".join(str(e).split())
                    errors.append(f"{m}: {text}" if isinstance(e, VitlensError) else f"{m}: unexpected "
                                  f"{type(e).__name__}: {text}")
                    continue
                keys.append(res.key)
                shown = ", ".join(f"{k}={v!r}" for k, v in res.params.items()) or "defaults"
                lines.append(f"| {m} | {res.seconds:.2f} s{' (cached)' if cached else ''} | {res.label.split(',')[0]} "
                             f"| {'' if res.score is None else f'{res.score:.3f}'} | {shown} |")
            progress((len(chosen), len(chosen)), desc="done")
            items, paths = gallery_items(keys, alpha)
            table = ("| method | time | target | p (clean) | parameters |\n|---|---|---|---|---|\n" + "\n".join(lines)
                     if lines else "")
            new_state = dict(st, results=keys)
            choices = [(explorer.result(k).title(), k) for k in keys]
            msg = (f"Explained {label.split(',')[0]}" + (f" with {', '.join(explorer.result(k).method for k in keys)}."
                                                         if keys else "."))
            if errors:
                gr.Warning("; ".join(errors))
                head = _err("; ".join(errors))
                status_html = head + (_ok(msg) if keys else "")
            else:
                status_html = _ok(msg)
            return (status_html, items, paths or None, table, new_state,
                    gr.update(choices=choices, value=choices[0][1] if choices else None))

        run_outputs = [status, gallery, files, timings, state, faith_map]
        run.click(guard(on_run, failing(len(run_outputs))), [state, methods, klass, prompt, seed, opacity, *comps],
                  run_outputs, concurrency_id="model", api_visibility="private")

        def on_opacity(st, alpha):
            keys = (st or {}).get("results") or []
            if not keys:
                return gr.skip(), gr.skip(), gr.skip()
            items, paths = gallery_items(keys, alpha)
            return gr.skip(), items, paths  # the status line keeps the run's message

        opacity.input(guard(on_opacity, failing(3)), [state, opacity], [status, gallery, files],
                      api_visibility="private", trigger_mode="always_last")

        # faithfulness
        def step_views(st, step_v):
            c = explorer.curve((st or {}).get("curves"))
            if c is None:
                return gr.skip(), gr.skip(), gr.skip()
            res = explorer.result(c.map_key)
            k = int(min(max(int(step_v or 0), 0), c.n_steps))
            d, i, n = explorer.step_images(res, c, k)
            fig = curves_figure(c, k, title=f"{res.method} · {res.label.split(',')[0]} · substrate {c.substrate}")
            return (fig,
                    gr.update(value=to_uint8(d), label=f"deletion after {k} steps ({n} px): score {c.deletion[k]:.4f}"),
                    gr.update(value=to_uint8(i),
                              label=f"insertion after {k} steps ({n} px): score {c.insertion[k]:.4f}"))

        def on_plot(st, key, sub, n_steps, step_v, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            if not key:
                raise_input("no map yet: run a method in the Explain tab first, then choose its map here.")
            if n_steps is None:
                raise_input("steps is empty: give an integer (e.g. 224).")
            res = explorer.result(key)
            progress(0, desc=f"insertion and deletion of {res.method}")
            c = explorer.faithfulness(res, sub, int(n_steps), progress=True)
            path = explorer.out_dir / res.key / f"curves_{c.key}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(c.as_json(), indent=1))
            new_state = dict(st or {}, curves=c.key)
            k = int(min(max(int(step_v or 0), 0), c.n_steps))
            fig, d, i = step_views(new_state, k)
            text = (f"**{res.method}** on {res.label.split(',')[0]}, substrate `{c.substrate}`, {c.n_steps} steps: "
                    f"insertion AUC = <span id='ins-auc'>{c.insertion_auc:.6f}</span> (higher is better), "
                    f"deletion AUC = <span id='del-auc'>{c.deletion_auc:.6f}</span> (lower is better); "
                    f"{2 * len(c.xs)} forward passes in {c.seconds:.1f} s.")
            return (_ok(f"Plotted the curves of {res.method}."), text, fig, gr.update(maximum=c.n_steps, value=k), d, i,
                    str(path), new_state)

        plot_outputs = [status, auc, curve_img, step, del_img, ins_img, curves_file, state]
        plot.click(guard(on_plot, failing(len(plot_outputs))), [state, faith_map, substrate, steps, step], plot_outputs,
                   concurrency_id="model", api_visibility="private")
        step.input(guard(lambda st, k: (gr.skip(),) + step_views(st, k), failing(4)), [state, step],
                   [status, curve_img, del_img, ins_img], api_visibility="private", trigger_mode="always_last")

        # bench
        if bench is not None:
            def on_filter(cls, method, search, sort, order):
                h, r, n = bench.rows(cls, method, search, None if sort == "(image id)" else sort,
                                     order == "descending")
                more = f" (first {len(r)} shown)" if n > len(r) else ""
                return gr.skip(), pd.DataFrame(r, columns=h), f"{n} rows{more}."

            f_inputs = [b_cls, b_method, b_search, b_sort, b_order]
            f_outputs = [status, b_rows, b_count]
            for comp in (b_cls, b_method, b_sort, b_order):
                comp.change(guard(on_filter, failing(3)), f_inputs, f_outputs, api_visibility="private")
            b_search.submit(guard(on_filter, failing(3)), f_inputs, f_outputs, api_visibility="private")
            demo.load(guard(on_filter, failing(3)), f_inputs, f_outputs, api_visibility="private")

            def on_show(image_id, alpha):
                if not image_id:
                    raise_input("choose an image id first.")
                maps, note = bench.image_maps(str(image_id).strip())
                items = []
                for _, m, pixels, caption in maps:
                    items.append((heat_rgb(m) if pixels is None else overlay_rgb(pixels, m, alpha), caption))
                return _ok(f"{len(items)} maps of {image_id}."), note, items

            b_show.click(guard(on_show, failing(3)), [b_image, opacity], [status, b_note, b_maps],
                         api_visibility="private")
            b_image.select(guard(on_show, failing(3)), [b_image, opacity], [status, b_note, b_maps],
                           api_visibility="private")

            def on_row(table, evt):
                row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
                return str(table.iloc[int(row), 0])

            on_row.__annotations__ = {"evt": gr.SelectData}  # how Gradio passes the selection (no string annotation)

            b_rows.select(on_row, [b_rows], [b_image], api_visibility="private").then(
                guard(on_show, failing(3)), [b_image, opacity], [status, b_note, b_maps], api_visibility="private")
    return demo


def raise_input(msg: str):
    from ..errors import InputError

    raise InputError(msg)


def launch(explorer: Explorer, bench=None, *, host: str = "127.0.0.1", port: Optional[int] = 7860,
           block: bool = True, quiet: bool = False):
    """Build and start the app (blocks until interrupted unless ``block=False``); returns (demo, url)."""
    demo = build_app(explorer, bench)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=quiet,
                            share=False, inbrowser=False, show_error=False, ssr_mode=False,
                            max_file_size=explorer.max_bytes, allowed_paths=[str(explorer.out_dir)],
                            theme=None, css=CSS, footer_links=[])
    if block:
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            demo.close()
            explorer.close()
    return demo, url
