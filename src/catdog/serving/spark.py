"""Batch scoring on Spark with the registered model (``catdog spark-predict``, needs ``catdog[spark]``).

:func:`classify` adds the registered pyfunc's answer to a DataFrame of encoded images, through
MLflow's Spark UDF: ``label``, one ``p_<class>`` per class of the model and ``error``, with the very
decoding and per-row errors of ``catdog predict`` (the pyfunc is :mod:`catdog.serving.pyfunc`).
:func:`spark_predict` reads a folder, glob or object-store prefix with Spark's ``binaryFile`` source
and writes that answer, one row per image file, as Parquet. Executors run the model in their own
Python (``env_manager="local"``): they need the model's requirements, not catdog.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from catdog.core.errors import CatdogError
from catdog.core.paths import ONNX_FILE, find_root
from catdog.data.images import BadImage, check_size, decode_image
from catdog.serving.predict import IMAGE_SUFFIXES, ExportedModel
from catdog.tracking.spark import download_model, model_udf

# Rows of one Arrow batch handed to the model: what an executor's Python holds at once, whatever the
# partition's size. As `catdog predict --batch-size`: ONNX Runtime's activations grow with it.
BATCH_SIZE = 16
BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"
_ANSWER = "_catdog_answer"  # the UDF's struct, before its fields become columns
MAX_LENGTH_CONF = "spark.sql.sources.binaryFile.maxLength"  # binaryFile fails a read past it
# catdog predict's image suffixes, in any case (Hadoop's glob is case-sensitive)
IMAGE_GLOB = "*.{" + ",".join("".join(f"[{c.lower()}{c.upper()}]" for c in s[1:]) for s in sorted(IMAGE_SUFFIXES)) + "}"


@dataclass(frozen=True)
class SparkModel:
    """A registered catdog pyfunc, fetched once on the driver: its MLflow folder (what the UDF
    ships to the executors) and its exported model (classes, byte cap), checked as predict checks it."""

    folder: Path
    exported: ExportedModel

    @classmethod
    def load(cls, uri: str) -> SparkModel:
        folder = download_model(uri, find_root(Path.cwd()) or Path.cwd())
        if not (folder / "artifacts" / ONNX_FILE).is_file():
            raise CatdogError(f"{uri} is not a catdog image model (no artifacts/{ONNX_FILE}): export registers one")
        return cls(folder, ExportedModel.load(folder / "artifacts" / ONNX_FILE))

    def classify(self, frame: DataFrame, content: str = "content", batch_size: int = BATCH_SIZE) -> DataFrame:
        """``frame`` with the model's columns added (``label``, ``p_<class>``..., ``error``)."""
        frame.sparkSession.conf.set(BATCH_CONF, str(batch_size))
        udf = model_udf(frame.sparkSession, self.folder)
        answer = udf(F.struct(F.col(content).alias("image")))  # the pyfunc's `image` column, as bytes
        answered = frame.withColumn(_ANSWER, answer)
        # MLflow's UDF turns None into "None" in a string field and into NaN in a double one when the batch
        # also holds values (astype): the pyfunc's contract puts the nulls back (a row with an error has
        # nothing else; an error is "<cause>: <detail>", never "None")
        error = F.nullif(F.col(f"{_ANSWER}.error"), F.lit("None"))
        fields = [
            (error if name == "error" else F.when(error.isNull(), F.col(_ANSWER).getField(name))).alias(name)
            for name in udf.returnType.fieldNames()
        ]
        return answered.select(*frame.columns, *fields)

    def score_files(self, spark: SparkSession, source: str, batch_size: int = BATCH_SIZE) -> DataFrame:
        """One row per image file under ``source``: ``path``, then the model's columns. Files over the
        model's byte cap are never read (their error comes from their length); empty ones, which
        Spark's file sources skip, get the error ``catdog predict`` gives them."""
        files = read_image_files(spark, source)
        listed = _listed_paths(spark, files, source)
        cap = self.exported.max_image_bytes
        if cap:
            spark.conf.set(MAX_LENGTH_CONF, str(min(cap, 2**31 - 1)))  # a file past it read anyway: fail
        readable = files.where(F.col("length") <= cap) if cap else files  # pushed into the reader
        scored = self.classify(readable.select("path", "content"), "content", batch_size).drop("content")
        length = F.col("length")
        error = F.when(length.isNull(), F.lit(_empty_file_error()))  # listed, never read: zero bytes
        if cap:
            error = error.when(length > cap, _too_large_error(length, cap))
        unread = listed.join(files.select("path", "length"), "path", "left").select("path", error.alias("error"))
        return scored.unionByName(unread.where(F.col("error").isNotNull()), allowMissingColumns=True)


def classify(frame: DataFrame, model_uri: str, content: str = "content", batch_size: int = BATCH_SIZE) -> DataFrame:
    """``frame`` (encoded images in column ``content``, as binaryFile gives them) with the answer of the
    model at ``model_uri`` added: ``label``, ``p_<class>`` for each of its classes, ``error``. Sets the
    session's ``spark.sql.execution.arrow.maxRecordsPerBatch`` to ``batch_size``: executors hold that
    many images at a time, however large a partition."""
    return SparkModel.load(model_uri).classify(frame, content, batch_size)


def read_image_files(spark: SparkSession, source: str) -> DataFrame:
    """The image files (catdog predict's suffixes, any case) under a folder, glob or object-store
    prefix, recursively, as Spark's ``binaryFile`` rows: path, modificationTime, length, content."""
    reader = spark.read.format("binaryFile").option("pathGlobFilter", IMAGE_GLOB)
    try:
        return reader.option("recursiveFileLookup", "true").load(source)
    except AnalysisException as exc:  # PATH_NOT_FOUND, an unknown file system...
        raise CatdogError(f"cannot read {source}: {str(exc).splitlines()[0]}") from None


def _listed_paths(spark: SparkSession, files: DataFrame, source: str) -> DataFrame:
    """Every file of the source's listing, empty ones too, as binaryFile's ``path`` spells it
    (``Path.toString``: ``file:/a b.jpg``; the listing gives URIs: ``file:///a%20b.jpg``)."""
    uris = files.inputFiles()
    if not uris:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise CatdogError(f"no images in {source} (files named {suffixes}, in any case, in any subfolder)")
    paths = []
    for uri in uris:
        parts = urlsplit(uri)
        paths.append(f"{parts.scheme}:{'//' + parts.netloc if parts.netloc else ''}{unquote(parts.path)}")
    return spark.createDataFrame([(path,) for path in paths], "path string")


def _error_of(check) -> str:
    """The one-line error (``<cause>: <detail>``) that a check of catdog.data.images raises."""
    try:
        check()
    except BadImage as exc:
        return str(exc)
    raise AssertionError("the check passed")


def _empty_file_error() -> str:
    return _error_of(lambda: decode_image(b"", 1))


def _too_large_error(length: Column, cap: int) -> Column:
    """``check_size``'s error for each file from its length column, as ``catdog predict`` gives it."""
    probe = cap + 1
    before, after = _error_of(lambda: check_size(probe, cap)).split(str(probe), 1)
    return F.concat(F.lit(before), length.cast("string"), F.lit(after))


@dataclass(frozen=True)
class Written:
    files: int
    errors: int  # rows with an error (and no label)


def spark_predict(
    source: str, output: str, model_uri: str, master: str | None = None, batch_size: int = BATCH_SIZE
) -> Written:
    """Classify every image file under ``source`` and write ``output`` as Parquet: ``path``, ``label``,
    ``p_<class>``..., ``error``. It is written beside ``output`` and renamed onto it when complete, so
    a job stopped midway leaves ``output`` as it was. ``master``: Spark's (default: the one
    ``spark-submit`` was given, else ``local[*]``)."""
    model = SparkModel.load(model_uri)  # before Spark starts: a wrong model fails at once
    active = SparkSession.getActiveSession()
    spark = active or _start_session(master)
    try:
        fs, target, partial = _output_paths(spark, output)
        _write_replacing(model.score_files(spark, source, batch_size), fs, target, partial)
        counts = spark.read.parquet(output).agg(F.count("*"), F.count("error")).first()
        return Written(counts[0], counts[1])
    finally:
        if active is None:
            spark.stop()


def _start_session(master: str | None) -> SparkSession:
    from pyspark.errors import PySparkRuntimeError

    builder = SparkSession.builder.appName("catdog spark-predict")
    try:
        spark = (builder.master(master) if master else builder).getOrCreate()
    except PySparkRuntimeError as exc:  # JAVA_GATEWAY_EXITED: no java, or a JVM that did not start
        raise CatdogError(f"Spark did not start (Java 17 must be on PATH or in JAVA_HOME): {exc}") from None
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _output_paths(spark: SparkSession, output: str):
    """Hadoop's file system for ``output`` (any it knows: local, HDFS, S3...), its qualified path and
    the partial one beside it, ``.<name>.partial``. Something already at ``output`` is replaced only
    if it is a Spark job's output (``_SUCCESS``)."""
    hadoop = spark._jvm.org.apache.hadoop.fs  # PySpark has no public file-system API
    target = hadoop.Path(output)
    fs = target.getFileSystem(spark._jsc.hadoopConfiguration())
    target = fs.makeQualified(target)
    if fs.exists(target) and not fs.exists(hadoop.Path(target, "_SUCCESS")):
        raise CatdogError(f"{output} exists and is not the output of a Spark job: remove it or choose another OUTPUT")
    return fs, target, hadoop.Path(target.getParent(), f".{target.getName()}.partial")


def _write_replacing(frame: DataFrame, fs, target, partial) -> None:
    """``frame`` as Parquet to ``partial``, renamed onto ``target`` when complete; a killed run's
    partial output is removed by the next run. (On S3 the rename copies object by object: only a
    kill during that copy can leave part of the output at ``target``.)"""
    fs.delete(partial, True)
    frame.write.parquet(partial.toString())
    fs.delete(target, True)
    if not fs.rename(partial, target):
        raise CatdogError(f"cannot rename {partial} to {target}: the scores are in {partial}")
