"""Collections, documents and search routes. Thin: decode, call the document service, encode."""

from __future__ import annotations


from litestar import Controller, Request, Response, delete, get, post
from litestar.response import Stream
from litestar.datastructures import UploadFile

from appliance.errors import InvalidRequest
from appliance.api.http import SSE_HEADERS, json_response, sse, sse_event
from appliance.api.openapi import (
    AskEvent, CollectionDeleted, CollectionInfo, DocumentDeleted, DocumentInfo, IngestReport, ObjectList,
)
from appliance.protocol.documents import Answer, AskRequest, CreateCollection, DocumentIn, SearchHit, SearchRequest, SearchResponse
from appliance.services.ask import AskService
from appliance.protocol.openai import decode_request
from appliance.policy.gateway import RequestContext
from appliance.services.documents import DocumentService

MAX_UPLOAD_BYTES = 256 * 1024 * 1024


class DocumentsController(Controller):
    path = "/v1/collections"

    @post("/", status_code=201, opt={"request": CreateCollection, "response": CollectionInfo, "summary": "Create a collection"})
    async def create_collection(self, request: Request, document_service: DocumentService, ctx: RequestContext) -> Response[bytes]:
        body: CreateCollection = decode_request(await request.body(), CreateCollection)
        return json_response(await document_service.create(ctx.tenant.name, body.name), 201)

    @get("/", opt={"response": ObjectList[CollectionInfo], "summary": "List collections"})
    async def list_collections(self, document_service: DocumentService, ctx: RequestContext) -> Response[bytes]:
        return json_response({"object": "list", "data": document_service.list(ctx.tenant.name)})

    @delete("/{name:str}", status_code=200, opt={"response": CollectionDeleted, "summary": "Delete a collection"})
    async def delete_collection(self, name: str, document_service: DocumentService, ctx: RequestContext) -> Response[bytes]:
        await document_service.delete(ctx.tenant.name, name)
        return json_response({"name": name, "deleted": True})

    @post(
        "/{name:str}/documents", status_code=200, request_max_body_size=MAX_UPLOAD_BYTES,
        opt={"request": DocumentIn, "uploads": True, "response": IngestReport, "summary": "Add documents (text or files)"},
    )
    async def add_documents(self, name: str, request: Request, document_service: DocumentService, ctx: RequestContext) -> Response[bytes]:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            files = []
            for _, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files.append((value.filename or "upload", await value.read()))
            results = await document_service.ingest_files(ctx.tenant.name, name, files)
        else:
            doc: DocumentIn = decode_request(await request.body(), DocumentIn)
            res = await document_service.ingest_text(
                ctx.tenant.name, name, doc.text, doc_id=doc.id, title=doc.title, metadata=doc.metadata
            )
            results = [res]
        counts = {s: sum(1 for r in results if r.status == s) for s in ("ingested", "unchanged", "failed")}
        return json_response({"collection": name, "results": results, **counts})

    @get("/{name:str}/documents", opt={"response": ObjectList[DocumentInfo], "summary": "List documents"})
    async def list_documents(self, name: str, document_service: DocumentService, ctx: RequestContext) -> Response[bytes]:
        return json_response({"object": "list", "data": await document_service.documents(ctx.tenant.name, name)})

    @delete("/{name:str}/documents/{doc_id:str}", status_code=200, opt={"response": DocumentDeleted, "summary": "Delete a document"})
    async def delete_document(self, name: str, doc_id: str, document_service: DocumentService, ctx: RequestContext) -> Response[bytes]:
        await document_service.delete_document(ctx.tenant.name, name, doc_id)
        return json_response({"id": doc_id, "deleted": True})

    @post("/{name:str}/search", status_code=200, opt={"request": SearchRequest, "response": SearchResponse, "summary": "Search a collection"})
    async def search(self, name: str, request: Request, document_service: DocumentService, ctx: RequestContext) -> Response[bytes]:
        body: SearchRequest = decode_request(await request.body(), SearchRequest)
        f = body.filter
        if f is not None and f.page_from is not None and f.page_to is not None and f.page_from > f.page_to:
            raise InvalidRequest("filter.page_from is after filter.page_to.", param="filter")
        hits = await document_service.search(ctx.tenant.name, name, body.query, top_k=body.top_k, mode=body.mode, flt=f,
                                             rerank=body.rerank)
        ctx.count_retrieved(len(hits))
        data = [
            SearchHit(h.document_id, h.chunk_id, h.title, h.source, h.page, h.heading, h.text, h.start, h.end,
                      h.score, h.snippet, h.highlights, h.metadata)
            for h in hits
        ]
        return json_response(SearchResponse(body.query, body.mode, data))

    @post(
        "/{name:str}/ask", status_code=200,
        opt={"request": AskRequest, "response": Answer, "stream": AskEvent, "summary": "Answer from a collection, with citations"},
    )
    async def ask(self, name: str, request: Request, ask_service: AskService, ctx: RequestContext) -> Response[bytes] | Stream:
        body: AskRequest = decode_request(await request.body(), AskRequest)
        args = dict(top_k=body.top_k, model=body.model, max_tokens=body.max_tokens, policy=ctx, rerank=body.rerank,
                    answer_mode=body.answer_mode)
        if not body.stream:
            return json_response(await ask_service.ask(ctx.tenant.name, name, body.question, **args))
        events = await ask_service.stream(ctx.tenant.name, name, body.question, **args)
        return Stream(sse(sse_event(e) async for e in events), media_type="text/event-stream", headers=SSE_HEADERS)
