"""`tunesmith merge RUN_DIR` and `tunesmith export MODEL --format gguf` → `tunesmith.export`."""


def run_merge(args) -> int:
    from tunesmith.export.merge import dir_size, merge_run

    out = merge_run(args.run_dir, args.out, force=args.force)
    print(f"tunesmith: merged {args.run_dir} → {out} ({dir_size(out) / 2**20:.1f} MiB)")
    return 0


def run_export(args) -> int:
    from tunesmith.export.gguf import export_gguf, modelfile_path

    out = export_gguf(args.model, args.out, quant=args.quant, force=args.force)
    modelfile = modelfile_path(out)
    print(f"tunesmith: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.quant})")
    print(f"tunesmith: wrote {modelfile} (ollama create NAME -f {modelfile})")
    return 0
