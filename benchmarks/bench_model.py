"""Model-level benchmark on a real-shape MiniMax-M1 slice: the same as `minimax-m1 bench`."""
import sys

from minimax_m1.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
