"""Train a model: a thin shim for the `deepspeed` launcher, `torchrun`, `mpirun` and plain `python`.

    deepspeed --num_gpus 2 train.py --config configs/train/pt_tiny.json --ds_config zero3.json
    deepspeed --hostfile hostfiles/a100 train.py --ds_config zero3.json

Run `python train.py --help` for every option; the work happens in astrai_ds.training.run.
"""

from astrai_ds.training.run import main_and_exit

if __name__ == "__main__":
    main_and_exit()
