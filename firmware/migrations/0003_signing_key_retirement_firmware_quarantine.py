import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("firmware", "0002_key_custody_tuf_release_counter"),
    ]

    operations = [
        migrations.AddField(
            model_name="signingkey",
            name="retired_by",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="firmware.signingkey",
            ),
        ),
        migrations.AddField(
            model_name="signingkey",
            name="retirement",
            field=models.CharField(
                blank=True, help_text="The retiring key's signature (base64).", max_length=100
            ),
        ),
        migrations.AddField(
            model_name="firmware",
            name="quarantined_at",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
    ]
