"""From validated wire requests to engine requests and back: params, prompts, outputs, responses."""
