"""Train ChatGoT: python train.py --variant tiny [--data PATH] [section.field=value ...]

The same command as chatgot-train; its body is chatgot_jax/train_cli.py.
"""

from chatgot_jax.train_cli import command

if __name__ == "__main__":
    command()
