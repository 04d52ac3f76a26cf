"""KTO, ORPO and SimPO through trl: preference losses beside DPO, from one YAML (preference.yaml, `loss:`)."""
