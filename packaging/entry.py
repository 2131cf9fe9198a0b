"""PyInstaller entry point for the `appliance` binary."""

import multiprocessing

if __name__ == "__main__":
    multiprocessing.freeze_support()
    from appliance.cli import main

    main()
