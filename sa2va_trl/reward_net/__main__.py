"""`python -m sa2va_trl.reward_net RECIPE.yaml [--key value ...]`: train the reward network (see train.py)."""

from .train import main

if __name__ == "__main__":
    main()
