"""`python -m feather_vllm.evaluate`: the evaluation's short name
(feather_vllm.tools.evaluate). Nothing imports this module; the plugin's
import path stays free of the tools."""

if __name__ == "__main__":
    from feather_vllm.tools.evaluate import main

    main()
