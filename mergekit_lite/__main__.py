"""`python -m mergekit_lite ...` runs the CLI (this is what `accelerate launch -m mergekit_lite` uses)."""

from mergekit_lite.cli import main

if __name__ == "__main__":
    main()
