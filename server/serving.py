"""A job as its serving model sees it: the request it is asked, its quote, the next model of the chain."""

from __future__ import annotations

from providers.base import GenerationRequest
from providers.catalog import Catalog, CostQuery
from storage.models import Job


def next_model(job: Job) -> str | None:
    """The model after the one the job is on, in its chain; None at the end."""
    chain = job.spec.chain
    position = chain.index(job.serving_provider) if job.serving_provider in chain else len(chain)
    return chain[position + 1] if position + 1 < len(chain) else None


def generation_request(job: Job, catalog: Catalog) -> GenerationRequest:
    """What the job's serving model is asked for."""
    spec = job.spec
    active = job.serving_provider
    model = catalog.serving(active)
    prompt, negative = spec.prompt, spec.negative_prompt or None
    if negative and not model.supports_negative_prompt:
        # No model of the catalog takes a negative prompt natively; saying it in the prompt is what
        # each vendor's own guidance recommends.
        prompt, negative = f"{prompt}\n\nAvoid: {negative}", None
    return GenerationRequest(
        job_id=str(job.id),
        model=active,
        prompt=prompt,
        width=spec.width,
        height=spec.height,
        num_variants=spec.num_variants,
        negative_prompt=negative,
        seed=spec.seed,
        output_format=spec.output_format,
        reference_image_urls=spec.reference_image_urls,
        options=spec.options_for(active),
        resume_state=job.provider_state,
        spec=model,
        # what the job was accepted for, even if the catalog has moved on since
        vendor_model=job.served_model,
    )


def quote(job: Job, catalog: Catalog) -> int:
    """The quote of the model that served the job (with fallbacks, the job's own is the chain's most)."""
    spec = job.spec
    if not spec.fallback_providers:
        return job.estimated_cost_usd_micros
    active = job.serving_provider
    query = CostQuery(
        width=spec.width,
        height=spec.height,
        num_variants=spec.num_variants,
        reference_images=len(spec.reference_image_urls),
        options=spec.options_for(active),
    )
    return catalog.serving(active).estimate_usd_micros(query)
