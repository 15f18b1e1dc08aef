"""Sample from a checkpoint: python sample.py --checkpoint RUN_DIR --prompt "TYRION: " ...

The same command as chatgot-sample; its body is chatgot_jax/sample_cli.py.
"""

from chatgot_jax.sample_cli import command

if __name__ == "__main__":
    command()
