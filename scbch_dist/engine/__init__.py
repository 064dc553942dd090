"""The training engine (docs/engine.md): everything that holds training state or talks across
processes while a run trains.

    setup       the accelerator, the data, the method, the model and optimizer
    encode      exactly-once encoding passes over a split, gathered by id
    bank        the [u, v] bank of the training set that refreshes search (pass or memory)
    loop        train_one_epoch, the method hooks, the exchange of per-id tables, fit, the summary
    scoring     query/database codes, ranking metrics, codes.npz
    checkpoint  model, optimizer and RNG through Accelerate; run state (JSON) and tables (safetensors)
    state       the typed run state
    rundir      the run folder: its lock, its preparation for a run (resume checks), clean-up and launch state
    preflight   everything checked before the first step (settings, shards, a server's shards)
    stop        stopping on SIGTERM, SIGUSR1, Ctrl-C or RUN_DIR/STOP, with a checkpoint
    runlog      log.txt and metrics.jsonl
    threads     the CPU threads a training process takes, and why

The library it drives (data, models, losses, knn, metrics, tables) holds no training state, and
the methods (scbch_dist.methods) plug into it without changing it.
"""
