"""What users read: the HTML rendering (`html`), the figures (`plots`) and the class colours
(`palette`). The report stage itself is `pipeline.stages.report`."""
