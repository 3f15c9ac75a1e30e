"""Launchers: the STORMS stage sequence on Slurm (submitit), on this machine, or in-process.

- :mod:`.cli`     ``storms launch``: ``add_launch_parser``, ``cmd_launch``, ``launch``, ``show_status``
- :mod:`.prepare` options, checks before submission, the stage list, sweeps
- :mod:`.submit`  executors, sbatch scripts (dry run), dependencies, the MLflow parent run
- :mod:`.stages`  the checkpointable stage callables and the torch.distributed environment of a job
- :mod:`.state`   ``RUN_DIR/launch.json``, ``--status``, ``--cancel``, ``wait``
- ``slurm/local_cluster.sh``  a single-node Slurm on this machine (tests, trying things out)
"""
