"""quantbench entry point: `python run.py [-m] method=awq,gptq model=tiny ...` (see `python run.py --help`);
`quantbench run ...` is the same."""

from quantbench.ops.app import main

if __name__ == "__main__":
    main()
