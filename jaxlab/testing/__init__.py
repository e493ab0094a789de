"""Helpers for tests and examples: tiny fixtures written in real file formats."""

from jaxlab.models.decoder import DecoderConfig

# A tiny decoder for generation tests: compiles in seconds, vocabulary ids 0-49.
TINY_DECODER = DecoderConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=128,
)


def replay_modes(
    tasks, table, config, *, scale, workload=None, modes=("serial", "paste", "oracle")
):
    """Replays each task in every mode with tiny latencies (``scale``) and a near-instant thinker;
    yields ``(task, {mode: TaskRun}, gold outputs)``: the JSON outputs of running the task's gold
    calls directly, which a lossless replay must reproduce."""
    import json

    from jaxlab.agents.bench import SleepThinker, replay_task, training_logs
    from jaxlab.agents.executor import ToolScheduler

    direct = {log.task_id: log for log in training_logs(tasks, workload)}
    think = SleepThinker(0.0005)
    with ToolScheduler(workers=8) as sched:
        for task in tasks:
            runs = {
                mode: replay_task(
                    task,
                    mode,
                    think=think,
                    config=config,
                    scale=scale,
                    scheduler=sched,
                    table=table,
                    seconds_per_token=(0.0, 0.0005),
                )
                for mode in modes
            }
            gold = [
                json.dumps(e.output, sort_keys=True, default=str)
                for e in direct[task.id].tool_events()
            ]
            yield task, runs, gold
