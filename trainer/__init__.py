"""The online trainer: SFT, K-way reward model and PPO-ptx rounds fed from Kafka.

Training math lives in pure functions (`trainer.losses`) and one step function per round type
(`trainer.sft.sft_step`, `trainer.rm.rm_step`, `trainer.ppo.rollout` + `trainer.ppo.ppo_step`);
the loop that consumes, gates and publishes is built on top of them. Past one device:
`trainer.distributed` (torchrun, FSDP2), `trainer.lora` (peft adapters), `trainer.plan` (the
memory plan every round is checked against).
"""
